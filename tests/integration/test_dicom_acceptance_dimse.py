"""cxr_dicom.acceptance behind a real pynetdicom C-STORE SCP: a pynetdicom SCU gets the status the check gives."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt

from cxr_dicom.acceptance import Refusal, check_part10
from tests.support.paths import DICOM_DIR

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit]
SOP_CLASSES = [DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage, CTImageStorage]


@pytest.fixture
def scp():
    accepted: list[str] = []

    def on_store(event):
        try:
            result = check_part10(event.encoded_dataset(), declared_sop_class=event.request.AffectedSOPClassUID)
        except Refusal as refusal:
            return refusal.dimse_status
        accepted.append(result.sop_instance_uid)
        return 0x0000

    ae = AE(ae_title="CXRNODE")
    for sop_class in SOP_CLASSES:
        ae.add_supported_context(sop_class, SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], accepted
    finally:
        server.shutdown()


def send(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_c_store_statuses_from_the_intake_check(scp):
    port, accepted = scp
    dx = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    sc = pydicom.dcmread(DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    no_pixels = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    del no_pixels.PixelData
    corrupt = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-12bit-rle.dcm")
    corrupt.PixelData = corrupt.PixelData[:2000] + b"\xff" * (len(corrupt.PixelData) - 2000)
    other_modality = pydicom.dcmread(io.BytesIO((DICOM_DIR / "siim-cxr-mono2-jpeg-baseline.dcm").read_bytes()))
    other_modality.Modality = "OT"

    assert send(port, dx) == 0x0000
    assert send(port, sc) == 0x0000
    assert send(port, ct) == 0xA900
    assert send(port, other_modality) == 0xA900
    assert send(port, no_pixels) == 0xA900
    assert send(port, corrupt) == 0xC000
    assert accepted == [dx.SOPInstanceUID, sc.SOPInstanceUID]
