"""`security.anonymize_dicom` on the DICOM node, on the real stack of test_dicom_node (real classification and
segmentation services, a real Orthanc): the services get only an anonymized copy (seen through a recording
proxy in front of each real service), while the SR and the SEG Orthanc stores carry the source's patient and
study and sit in the source's study."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom

from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from tests.integration.test_dicom_node import (
    WAIT_S,
    LoopThread,
    Stack,
    _start,
    c_store,
    copy_with_new_uids,
    node_settings,
    orthanc_instances,
    stack,
    stow,
)
from tests.support.grpc_recorder import RecordingProxy
from tests.support.paths import dicom_files

__all__ = ["stack"]

IDENTIFIERS = {
    "PatientName": "Doe^Janet",
    "PatientID": "PID-4711-CXR",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-998877",
    "StudyID": "STUDY-5521",
    "ReferringPhysicianName": "Referrer^Rhonda",
    "InstitutionName": "St Example Hospital",
}


def _identified_copy(out: Path) -> pydicom.Dataset:
    path, ds = copy_with_new_uids(dicom_files()[0], out)
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _image_of(body: bytes, request: type[cls_pb.ClassifyImageRequest] | type[seg_pb.SegmentImageRequest]) -> bytes:
    return request.FromString(body).image.data


def test_services_get_an_anonymized_copy_and_the_pacs_gets_results_under_the_source_patient(
    stack: Stack, tmp_path: Path
) -> None:
    loop = LoopThread()
    proxies = [RecordingProxy(f"127.0.0.1:{port}") for port in stack.analysis_ports]
    try:
        for proxy in proxies:
            loop.run(proxy.start())
        settings = node_settings(tmp_path, stack.orthanc, proxies[0].port, proxies[1].port)
        settings = settings.model_copy(
            update={"security": settings.security.model_copy(update={"anonymize_dicom": True})}
        )
        server = loop.run(_start(settings, dicom_binding(settings)))
        mine = Stack(loop, stack.orthanc, server, tmp_path)  # this node's status stub
        node = mine.node
        try:
            dimse = _identified_copy(tmp_path / "dimse")
            assert c_store(node.dimse_port, dimse) == 0x0000
            stowed = _identified_copy(tmp_path / "stow")
            buf = io.BytesIO()
            stowed.save_as(buf, enforce_file_format=True)
            answer = stow(node.stow_port, [("application/dicom", buf.getvalue())])
            assert answer.status_code == 200, answer.text
            sources = {str(dimse.SOPInstanceUID): dimse, str(stowed.SOPInstanceUID): stowed}
            answers = mine.wait_finished([str(ds.StudyInstanceUID) for ds in sources.values()], WAIT_S)
            assert all(a.done == 1 for a in answers.values()), answers
        finally:
            mine.channel.close()
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        for proxy in proxies:
            loop.run(proxy.stop(), timeout=30)
        loop.close()

    # What the services received: an anonymized copy of each instance, and nothing else.
    sent = [(body, cls_pb.ClassifyImageRequest) for body in proxies[0].of("/ClassifyImage")]
    sent += [(body, seg_pb.SegmentImageRequest) for body in proxies[1].of("/SegmentImage")]
    seen: dict[str, int] = {}
    for body, request in sent:
        for value in IDENTIFIERS.values():
            assert value.encode() not in body
        image = pydicom.dcmread(io.BytesIO(_image_of(body, request)), stop_before_pixels=True)
        assert image.PatientName == "ANONYMIZED" and image.PatientID == "ANONYMIZED"
        for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName", "InstitutionName"):
            assert keyword not in image, keyword
        seen[str(image.SOPInstanceUID)] = seen.get(str(image.SOPInstanceUID), 0) + 1
    assert seen == {sop: 2 for sop in sources}  # one classification and one segmentation each

    # What the PACS stored: an SR and a SEG per source, in its study, under its patient.
    for sop, source in sources.items():
        study = str(source.StudyInstanceUID)
        stored = {
            str(ds.Modality): ds for ds in orthanc_instances(stack.orthanc, study) if ds.Modality in ("SR", "SEG")
        }
        assert set(stored) == {"SR", "SEG"}, study
        for ds in stored.values():
            assert ds.StudyInstanceUID == study
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
                assert str(ds.get(keyword)) == IDENTIFIERS[keyword], (ds.Modality, keyword)
            assert str(ds.ReferringPhysicianName) == IDENTIFIERS["ReferringPhysicianName"]
            assert ds.StudyDate == source.get("StudyDate", "")
        evidence = stored["SR"].CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == study
        series = evidence.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
        seg = stored["SEG"]
        refs = [
            (s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
            for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence
        ]
        assert refs == [(source.SeriesInstanceUID, sop)]
