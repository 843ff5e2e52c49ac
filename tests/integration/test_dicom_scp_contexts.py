"""The C-STORE SCP's presentation contexts: the ones pynetdicom's own `add_supported_context` makes, copied per
association without re-creating their UIDs, and negotiated by a real association on 127.0.0.1; and the node's
SCP's maximum PDU, as a real association negotiates it."""

from __future__ import annotations

import copy

import pydicom
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_dicom.config import DicomConfig
from cxr_dicom.intake import Intake
from cxr_dicom.intakes import SCP_MAX_PDU_BYTES, start_scp, supported_contexts
from cxr_dicom.priority import PriorityPolicy
from cxr_dicom.work_queue import WorkQueue
from tests.support.paths import DICOM_DIR

STOW = {"stow_url": "http://127.0.0.1:9/dicom-web"}

ATTRIBUTES = ("abstract_syntax", "transfer_syntax", "context_id", "result", "scu_role", "scp_role", "as_scu", "as_scp")


def fields(context):
    return tuple(getattr(context, name) for name in ATTRIBUTES)


def test_the_scps_contexts_are_pynetdicoms_and_a_per_association_copy_shares_their_uids():
    plain = AE()
    for context in StoragePresentationContexts:
        plain.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    plain.add_supported_context(Verification)
    kept = supported_contexts()
    assert [fields(c) for c in kept] == [fields(c) for c in plain.supported_contexts]
    storage = [c for c in kept if c.abstract_syntax != Verification]
    assert len(storage) > 100 and all(len(c.transfer_syntax) == len(ALL_TRANSFER_SYNTAXES) for c in storage)
    copies = copy.deepcopy(kept)  # what pynetdicom's association server does for every association
    assert [fields(c) for c in copies] == [fields(c) for c in kept]
    for original, clone in zip(kept, copies, strict=True):
        assert clone is not original and clone.transfer_syntax is not original.transfer_syntax
        assert clone.abstract_syntax is original.abstract_syntax  # the UID object itself: not re-created
        assert all(a is b for a, b in zip(clone.transfer_syntax, original.transfer_syntax, strict=True))


def test_an_association_negotiates_the_scps_contexts():
    scp = AE(ae_title="CXRNODE")
    server = scp.start_server(("127.0.0.1", 0), block=False, contexts=supported_contexts())
    try:
        for _ in range(2):  # each association gets its own copy of the contexts
            scu = AE(ae_title="MODALITY")
            scu.add_requested_context(DigitalXRayImageStorageForPresentation, [JPEGBaseline8Bit])
            scu.add_requested_context(Verification, [ExplicitVRLittleEndian])
            scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 30
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="CXRNODE")
            assert assoc.is_established
            try:
                accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
                assert accepted == {
                    (DigitalXRayImageStorageForPresentation, JPEGBaseline8Bit),
                    (Verification, ExplicitVRLittleEndian),
                }
                assert int(assoc.send_c_echo().Status) == 0
            finally:
                assoc.release()
    finally:
        server.shutdown()


def test_the_node_scp_takes_a_radiograph_in_pdus_of_its_larger_maximum(tmp_path):
    """The node's SCP announces `SCP_MAX_PDU_BYTES`, so a sender splits a radiograph into a few PDUs, not into
    hundreds of pynetdicom's default 16 KB; the instance arrives whole and is queued."""
    source = max(DICOM_DIR.glob("*.dcm"), key=lambda p: p.stat().st_size)
    ds = pydicom.dcmread(source)
    cfg = DicomConfig.model_validate(
        {"data_path": str(tmp_path), "ae_title": "CXRNODE", "dimse_port": 0, "destinations": STOW}
    )
    with WorkQueue(tmp_path) as queue:
        server = start_scp(cfg, Intake(tmp_path, queue, PriorityPolicy(), anonymize=False), "127.0.0.1")
        try:
            scu = AE(ae_title="MODALITY")
            scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 30
            pdus: list[int] = []
            handlers = [(evt.EVT_PDU_SENT, lambda event: pdus.append(len(event.data)))]
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="CXRNODE", evt_handlers=handlers)
            assert assoc.is_established
            try:
                assert assoc.acceptor.maximum_length == SCP_MAX_PDU_BYTES
                pdus.clear()
                assert int(assoc.send_c_store(source).Status) == 0x0000
            finally:
                assoc.release()
        finally:
            server.shutdown()
        assert queue.get(ds.SOPInstanceUID) is not None
    size = source.stat().st_size
    assert size > 16_384 * 4 and len(pdus) <= 2 + size // SCP_MAX_PDU_BYTES + 1  # at most a few, with the release
