"""The C-STORE SCP's presentation contexts: the ones pynetdicom's own `add_supported_context` makes, copied per
association without re-creating their UIDs, and negotiated by a real association on 127.0.0.1."""

from __future__ import annotations

import copy

from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_dicom.intakes import supported_contexts

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
