"""A real Orthanc PACS: the SR of cxr_dicom.sr goes in by STOW-RS and comes back by QIDO-RS and WADO-RS;
real radiographs go in by C-STORE from pynetdicom and from DCMTK storescu."""

from __future__ import annotations

import io
import subprocess

import highdicom as hd
import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE

from cxr_dicom.results import NOT_FOR_DIAGNOSTIC_USE, Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.sr import build_sr, device_uid
from tests.support.orthanc import require, run_orthanc
from tests.support.paths import DICOM_DIR, dicom_files

CLASSIFIER = Algorithm("densenet121-res224-nih", "1.2.0", "9f2c" * 16, untrained=True)
SEGMENTER = Algorithm("cxr-unet-anatomy", "0.3.1", "a1b2" * 16)
RESULTS = (
    AlgorithmResult(CLASSIFIER, (Finding("Effusion", 0.81, 0.5, True), Finding("Nodule", 0.2, 0.6, False))),
    AlgorithmResult(
        SEGMENTER, (), (Measurement("cardiothoracic_ratio", 0.47, "1"), Measurement("heart_area", 9000.0, "mm2"))
    ),
)


@pytest.fixture
def orthanc(tmp_path):
    with run_orthanc(tmp_path / "orthanc") as server:
        yield server


def test_sr_stow_rs_then_qido_rs_and_wado_rs(orthanc):
    source = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    sr = build_sr(source, RESULTS)
    client = DICOMwebClient(url=orthanc.dicomweb_url)

    response = client.store_instances(datasets=[sr])
    assert not response.get("FailedSOPSequence")  # Orthanc sends it empty when nothing failed
    [stored] = response.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == sr.SOPInstanceUID

    found = client.search_for_instances(
        study_instance_uid=source.StudyInstanceUID, search_filters={"SOPInstanceUID": sr.SOPInstanceUID}
    )
    assert len(found) == 1
    qido = pydicom.Dataset.from_json(found[0])
    assert (qido.StudyInstanceUID, qido.SeriesInstanceUID, qido.SOPInstanceUID) == (
        source.StudyInstanceUID,
        sr.SeriesInstanceUID,
        sr.SOPInstanceUID,
    )
    assert qido.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    series = client.search_for_series(study_instance_uid=source.StudyInstanceUID, search_filters={"Modality": "SR"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series] == [sr.SeriesInstanceUID]

    wado = client.retrieve_instance(source.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    buf = io.BytesIO()
    wado.save_as(buf, enforce_file_format=True)
    back = hd.sr.srread(io.BytesIO(buf.getvalue()))
    assert back.SOPInstanceUID == sr.SOPInstanceUID and back.StudyInstanceUID == source.StudyInstanceUID
    ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert NOT_FOR_DIAGNOSTIC_USE in back.SeriesDescription
    devices = {i.get("DeviceUID") for i in back.ContributingEquipmentSequence}
    assert {device_uid(CLASSIFIER), device_uid(SEGMENTER)} <= devices
    groups = back.content.get_image_measurement_groups()
    assert [g.finding_type.value for g in groups[:2]] == ["60046008", "27925004"]
    assert [m.value for m in groups[2].get_measurements()] == [0.47, 9000.0]


def _c_store(orthanc, path) -> int:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="CXRTEST")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
    assert assoc.is_established, f"association refused by Orthanc:\n{orthanc.log()}"
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


def test_c_store_every_shared_radiograph_with_pynetdicom(orthanc):
    files = dicom_files()
    statuses = {path.name: _c_store(orthanc, path) for path in files}
    assert statuses == {path.name: 0x0000 for path in files}
    expected = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert orthanc.instance_uids() == expected
    # what Orthanc stored is the same image: its pixel data byte for byte
    source = pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm")
    [match] = [
        i
        for i in orthanc.get("/instances")
        if orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == source.SOPInstanceUID
    ]
    stored = pydicom.dcmread(io.BytesIO(httpx.get(f"{orthanc.url}/instances/{match}/file", timeout=30).content))
    assert stored.PixelData == source.PixelData


# storescu proposes uncompressed syntaxes unless told which compressed one to offer, and cannot transcode
# RLE itself: offer each file's own syntax.
STORESCU_PROPOSE = {"1.2.840.10008.1.2.5": "--propose-rle", "1.2.840.10008.1.2.4.50": "--propose-jpeg8"}


def test_c_store_every_shared_radiograph_with_dcmtk_storescu(orthanc):
    require("storescu")
    files = dicom_files()
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        propose = STORESCU_PROPOSE.get(syntax, "--propose-little")
        address = ("127.0.0.1", str(orthanc.dicom_port))
        result = subprocess.run(
            ["storescu", "-v", propose, "-aet", "CXRTEST", "-aec", orthanc.ae_title, *address, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert output.count("Received Store Response (Success)") == 1, output
    expected = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert orthanc.instance_uids() == expected


def test_orthanc_fixture_runs_two_on_ephemeral_ports_and_stops_them(tmp_path):
    with run_orthanc(tmp_path / "a") as a, run_orthanc(tmp_path / "b") as b:
        ports = {a.http_port, a.dicom_port, b.http_port, b.dicom_port}
        assert len(ports) == 4 and all(p > 1024 for p in ports)
        assert a.get("/system")["DicomPort"] == a.dicom_port and b.get("/system")["HttpPort"] == b.http_port
        assert "dicom-web" in a.get("/plugins/dicom-web")["ID"]
        assert (tmp_path / "a" / "storage").is_dir()
    assert a.process.returncode is not None and b.process.returncode is not None


def test_orthanc_answers_a_re_sent_result_with_success_by_stow_rs_and_c_store_and_keeps_one(orthanc, tmp_path):
    """The node's own senders send the same SR twice by STOW-RS and twice by C-STORE: Orthanc answers each with
    success (200 without failures, C-STORE 0x0000), so a resend counts as delivered, and stores it once."""
    from cxr_dicom.config import DestinationsConfig
    from cxr_dicom.worker import ResultObject, Senders

    sr = build_sr(pydicom.dcmread(DICOM_DIR / "nih-dx-mono2-8bit.dcm"), RESULTS)
    kept = [ResultObject.of(sr)]
    destinations = DestinationsConfig.model_validate(
        {
            "stow_url": orthanc.dicomweb_url,
            "cstore": {"host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.ae_title},
            "fhir_folder": str(tmp_path / "fhir"),
        }
    )
    senders = Senders(destinations, "CXRNODE")
    for _ in range(2):
        senders.stow(kept)
        senders.cstore(kept)
    assert orthanc.instance_uids() == {sr.SOPInstanceUID}
