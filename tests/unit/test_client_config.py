"""cxr_client configuration, retry policy and error translation (no server)."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cxr_client import SERVICE_CONFIG, ClientConfig
from cxr_client.errors import InvalidArgumentError, InvalidImageError, OverloadedError, ServerError, from_status
from cxr_client.images import decode_base64_image, sniff_content_type, to_image
from cxr_client.retry_policy import SERVICE_CONFIG_JSON, channel_options


def test_env_endpoints_and_overrides():
    cfg = ClientConfig.from_env({})
    assert cfg.endpoint_for("classification") == "127.0.0.1:50051"
    assert cfg.endpoint_for("rag") == "127.0.0.1:50053"
    cfg = ClientConfig.from_env(
        {"CXR_ENDPOINT": "gw.example:8443", "CXR_RAG_ENDPOINT": "rag.example:50053", "CXR_API_KEY": "k1,k2"}
    )
    assert cfg.endpoint_for("classification") == cfg.endpoint_for("segmentation") == "gw.example:8443"
    assert cfg.endpoint_for("rag") == "rag.example:50053"
    assert cfg.api_key == "k1"  # the server's comma-separated list: a client sends the first
    assert cfg.target_for("classification") == ("gw.example:8443", False)


def test_scheme_turns_tls_on():
    cfg = ClientConfig(endpoint="grpcs://gw.example:443")
    assert cfg.target_for("rag") == ("gw.example:443", True)
    assert ClientConfig.from_env({"CXR_TLS": "true", "CXR_ENDPOINT": "h:1"}).target_for("rag") == ("h:1", True)
    assert ClientConfig.from_env({"CXR_TIMEOUT_S": "2.5"}).timeout_s == 2.5
    with pytest.raises(ValueError):
        ClientConfig(timeout_s=0)


def test_retry_policy_is_a_valid_service_config():
    parsed = json.loads(SERVICE_CONFIG_JSON)
    assert parsed == SERVICE_CONFIG
    (method,) = parsed["methodConfig"]
    services = {n["service"] for n in method["name"]}
    assert {
        "cxr.classification.v1.ClassificationService",
        "cxr.segmentation.v1.SegmentationService",
        "cxr.rag.v1.RagService",
    } <= services
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5
    opts = dict(channel_options())
    assert opts["grpc.service_config"] == SERVICE_CONFIG_JSON and opts["grpc.enable_retries"] == 1
    assert "grpc.service_config" not in dict(channel_options(retries=False))
    grpc.insecure_channel("127.0.0.1:1", options=channel_options()).close()  # grpc accepts it


def _status(code: int, reason: str) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="cxr.platform", metadata={"k": "v"}))
    return status_pb2.Status(code=code, message="m", details=[detail])


def test_per_item_status_translation():
    err = from_status(_status(code_pb2.INVALID_ARGUMENT, "IMAGE_CORRUPT"))
    assert isinstance(err, InvalidImageError) and err.reason == "IMAGE_CORRUPT" and err.metadata == {"k": "v"}
    assert type(from_status(_status(code_pb2.INVALID_ARGUMENT, "INVALID_INPUT"))) is InvalidArgumentError
    assert isinstance(from_status(_status(code_pb2.RESOURCE_EXHAUSTED, "QUEUE_FULL")), OverloadedError)
    err = from_status(status_pb2.Status(code=code_pb2.INTERNAL, message="boom"))
    assert isinstance(err, ServerError) and err.reason == "" and err.to_dict()["code"] == "INTERNAL"
    assert str(err) == "INTERNAL: boom"


def test_image_inputs(tmp_path, sample_png):
    assert sniff_content_type(sample_png) == "image/png"
    assert sniff_content_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_content_type(b"\0" * 128 + b"DICM" + b"\0" * 8) == "application/dicom"
    assert sniff_content_type(b"hello") == ""
    p = tmp_path / "x.png"
    p.write_bytes(sample_png)
    assert to_image(str(p)).content_type == "image/png" and to_image(p).data == sample_png
    b64 = base64.b64encode(sample_png).decode()
    assert decode_base64_image(b64) == sample_png
    assert decode_base64_image("data:image/png;base64," + b64) == sample_png
    with pytest.raises(ValueError, match="base64"):
        decode_base64_image("not base64!!")
