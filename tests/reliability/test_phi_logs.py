"""PHI: what a service process writes (stdout + stderr, JSON lines at DEBUG, so every access
log line is there) never contains DICOM patient identifiers, pixel data or API keys.

Each service (the toy and every real service that is importable) runs as its own process and
gets the shared DICOM samples with planted identifiers (one PatientName longer than the 64
characters the PN VR allows, so pydicom's validation has something to complain about),
the original identifiers of the files, corrupt and truncated variants, a wrong API key, and
(segmentation) DICOM-SEG export, which copies the patient module."""

from __future__ import annotations

import base64
import io
import warnings

import grpc
import pydicom
import pytest

from tests.support.paths import dicom_files
from tests.support.service_process import service_process
from tests.support.targets import Target, available_targets

warnings.filterwarnings("ignore")

PLANTED_KEY = "sk-planted-api-key-5b1f0c7d9e"
WRONG_KEY = "sk-wrong-planted-key-0a9b8c7d"
PLANTED = {
    "PatientName": "Plantedsurname^Plantedgiven^" + "Q" * 60,  # over the PN limit: invalid on purpose
    "PatientID": "PID-PLANTED-93814",
    "OtherPatientIDs": "OPID-PLANTED-55102",
    "PatientBirthDate": "19370412",
    "AccessionNumber": "ACC-PLANTED-7731",
    "InstitutionName": "Planted General Hospital",
    "ReferringPhysicianName": "Refplanted^Doctor",
}


def planted_dicoms() -> tuple[list[bytes], set[str]]:
    """Planted copies of every shared DICOM, and every identifier value that must not leak."""
    blobs, secrets = [], {PLANTED_KEY, WRONG_KEY, *PLANTED.values(), "Plantedsurname", "Plantedgiven"}
    for path in dicom_files():
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID"):
            original = str(ds.get(keyword, "") or "")
            if len(original) >= 4 and original.lower() not in ("anonymous", "anonymized"):
                secrets.add(original)  # the file's own identifiers must not appear either
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        blobs.append(buf.getvalue())
    return blobs, secrets


def pixel_fragments(blob: bytes) -> list[str]:
    """How a slice of the pixel bytes would look if someone logged them."""
    chunk = blob[len(blob) // 2 : len(blob) // 2 + 48]
    return [base64.b64encode(chunk).decode(), chunk.hex(), repr(chunk)[2:-1][:60]]


def exercise(target: Target, port: int, blobs: list[bytes]) -> dict[str, int]:
    codes: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = target.stub(ch)

        def send(call, key: str = PLANTED_KEY) -> None:
            try:
                resp = getattr(stub, call.method)(call.request, metadata=(("x-api-key", key),), timeout=60)
                if call.streaming:
                    list(resp)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            codes[code] = codes.get(code, 0) + 1

        for blob in blobs:
            send(target.valid(blob, "application/dicom"))
            send(target.valid(blob[: len(blob) // 2], "application/dicom"))  # truncated: IMAGE_CORRUPT
            send(target.valid(blob, "image/png"))  # wrong content type
            send(target.valid(blob, "application/dicom"), key=WRONG_KEY)
        if target.name == "segmentation":
            from cxr_protos.common.v1 import common_pb2
            from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
            from tests.support.targets import Call

            for blob in blobs[:2]:
                request = pb.SegmentImageRequest(
                    image=common_pb2.Image(data=blob, content_type="application/dicom"),
                    include_dicom_seg=True,
                    include_overlay=True,
                )
                send(Call("SegmentImage", request))
        if target.name == "toy":
            from cxr_protos.classification.v1 import classification_service_pb2 as pb
            from cxr_protos.common.v1 import common_pb2
            from tests.support.targets import Call

            image = common_pb2.Image(data=blobs[0], content_type="application/dicom")
            send(Call("ClassifyImage", pb.ClassifyImageRequest(image=image, model_names=["explode"])))  # INTERNAL
    return codes


@pytest.mark.slow
def test_logs_carry_no_phi_pixels_or_keys(tmp_path):
    blobs, secrets = planted_dicoms()
    fragments = [f for blob in blobs for f in pixel_fragments(blob)]
    targets = available_targets(images_only=True)
    env_common = {"CXR_LOG_LEVEL": "DEBUG", "CXR_API_KEY": PLANTED_KEY, "PYTHONWARNINGS": "always"}
    results = {}
    for target in targets:
        env = {**env_common, **target.process_env}
        with service_process(tmp_path, module=target.module, service=target.service, env=env) as svc:
            results[target.name] = exercise(target, svc.port, blobs)
            svc.proc.terminate()
            svc.wait_exit(30)
            logs = svc.logs()
        assert results[target.name].get("OK", 0) >= len(blobs) - 1, (target.name, results[target.name])
        assert results[target.name].get("UNAUTHENTICATED", 0) == len(blobs)
        assert "rpc" in logs and "UNAUTHENTICATED" in logs, logs[-2000:]  # the access log was on and captured
        leaked = sorted(s for s in secrets if s.lower() in logs.lower())
        assert not leaked, f"{target.name} logged identifiers {leaked}"
        pixels = [f for f in fragments if f in logs]
        assert not pixels, f"{target.name} logged pixel bytes"
