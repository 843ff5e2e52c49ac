"""gateway/kong.yml against its typed model and against the protos' google.api.http annotations;
the gateway's pure parts (path templates, transcoding, status map, rate limiter, OpenAPI)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import grpc
import pytest
import yaml

from cxr_gateway import kong_model
from cxr_gateway.kong_model import KongConfigError
from cxr_gateway.limits import Acl, CorrelationId, KeyAuth, RateLimiter, SizeLimit
from cxr_gateway.openapi import build_openapi
from cxr_gateway.policies import Policies, RouteHit
from cxr_gateway.roles import ADMIN_GROUP, ADMIN_RPC_NAMES, INFERENCE_GROUP, admin_methods, unprotected_admin_routes
from cxr_gateway.routes import PathTemplate, ProtoCatalog, match_rest
from cxr_gateway.transcoding import (
    HTTP_STATUS_BY_CODE,
    TranscodeError,
    error_from_rpc,
    request_message,
    response_json,
)
from cxr_serving.errors import InvalidInputError
from cxr_serving.grpc_errors import error_info, status_for_exception, trailing_metadata
from tests.support.gateway_helpers import DESCRIPTOR, KONG_YML, load_kong
from tests.support.paths import REPO

ENV = {
    "DECK_BACKEND_PROTOCOL": "grpc",
    "DECK_CLASSIFICATION_HOST": "classification.cxr.svc",
    "DECK_CLASSIFICATION_PORT": "50051",
    "DECK_SEGMENTATION_HOST": "segmentation.cxr.svc",
    "DECK_SEGMENTATION_PORT": "50052",
    "DECK_RAG_HOST": "rag.cxr.svc",
    "DECK_RAG_PORT": "50053",
    "DECK_DICOM_HOST": "dicom.cxr.svc",
    "DECK_DICOM_PORT": "50055",
    "DECK_DICOM_STOW_PORT": "8043",
    "DECK_CXR_API_KEY": "k-123",
    "DECK_CXR_ADMIN_API_KEY": "adm-456",
    "DECK_OTEL_TRACES_ENDPOINT": "http://otel-collector:4318/v1/traces",
}


ACL_ADMIN = {"allow": ["admin"]}


@pytest.fixture(scope="module")
def catalog() -> ProtoCatalog:
    return ProtoCatalog.load(DESCRIPTOR)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(kong_model.render(KONG_YML.read_text(), ENV))


def validate(data: dict) -> kong_model.KongConfig:
    return kong_model.parse(yaml.safe_dump(data))


# ------------------------------------------------------------------ kong.yml validates
def test_kong_yml_validates_with_every_required_plugin(raw):
    kong = validate(raw)
    assert {p.name for p in kong.plugins} >= {
        "key-auth",
        "rate-limiting",
        "request-size-limiting",
        "correlation-id",
        "prometheus",
        "opentelemetry",
    }
    rl = kong.global_plugin("rate-limiting").config
    assert (rl.minute, rl.limit_by, rl.policy) == (100, "consumer", "local")
    assert kong.global_plugin("request-size-limiting").config.limit_bytes == 50 * 1024 * 1024
    assert set(kong.global_plugin("key-auth").config.key_names) == {"apikey", "x-api-key"}
    grpc_services = [s for s in kong.services if s.name != "dicom-stow"]  # dicom-stow: the plain-HTTP STOW-RS
    assert [s.name for s in grpc_services] == ["classification", "segmentation", "rag", "dicom"]
    for svc in grpc_services:
        assert svc.protocol == "grpc" and svc.retries >= 1
        up = kong.upstream(svc.host)
        assert up is not None and up.targets[0].target == f"{svc.name}.cxr.svc:{svc.port}"
        assert up.healthchecks.active.type == "grpc" and up.healthchecks.active.unhealthy.tcp_failures > 0
        assert up.healthchecks.passive.unhealthy.tcp_failures > 0


def test_tls_to_backends_is_one_variable(raw):
    kong = kong_model.parse(KONG_YML.read_text(), {**ENV, "DECK_BACKEND_PROTOCOL": "grpcs"})
    assert {s.protocol for s in kong.services if s.name != "dicom-stow"} == {"grpcs"}
    assert kong.service("dicom-stow").protocol == "http"  # the node's STOW-RS listener serves plain HTTP
    assert {u.healthchecks.active.type for u in kong.upstreams} == {"grpcs"}


def test_no_secret_committed_and_missing_variable_named():
    text = KONG_YML.read_text()
    assert "dev-key-change-me" not in text and "test-key" not in text
    with pytest.raises(KongConfigError, match="DECK_CXR_API_KEY"):
        kong_model.parse(text, {k: v for k, v in ENV.items() if k != "DECK_CXR_API_KEY"})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["plugins"][3]["config"].update(minutes=100), "minutes"),  # typo'd rate-limiting field
        (lambda d: d["plugins"][3]["config"].update(policy="memcached"), "policy"),
        (lambda d: d["plugins"][2]["config"].update(allowed_payload_size="big"), "allowed_payload_size"),
        (lambda d: d["plugins"][1]["config"].update(key_names="apikey"), "key_names"),
        (lambda d: d["plugins"].append({"name": "acme-auth"}), "acme-auth"),
        (lambda d: d["plugins"][3]["config"].pop("minute"), "at least one of second, minute"),
        (lambda d: d["services"][0]["routes"][0].update(strip_path=True), "strip_path"),
        (lambda d: d["services"][0]["routes"][0].update(methods=["POST"]), "methods"),
        (lambda d: d["services"][0]["routes"][0].update(protocols=["grpc", "http"]), "mutually exclusive"),
        (lambda d: d["services"][0].update(port=70000), "port"),
        (lambda d: d["services"][0].update(colour="blue"), "colour"),
        (lambda d: d.update(_format_version="2.1"), "_format_version"),
        (lambda d: d["upstreams"][0]["targets"][0].update(target="no-port"), "target"),
        (lambda d: d["upstreams"][0]["healthchecks"]["active"].update(type="smtp"), "type"),
        (lambda d: d["consumers"].append(copy.deepcopy(d["consumers"][0])), "duplicate"),
        (lambda d: d["services"][0]["routes"][1]["plugins"][0]["config"].update(proto=""), "proto"),
        (lambda d: d["services"][0]["plugins"][0]["config"].update(deny=["x"]), "exactly one of 'allow' or 'deny'"),
        (lambda d: d["services"][0]["plugins"][0]["config"].pop("allow"), "exactly one of 'allow' or 'deny'"),
        (lambda d: d["services"][0]["plugins"][0]["config"].update(allow=["admni"]), "admni"),  # no such group
        (lambda d: d["services"][0]["plugins"][0]["config"].update(hide_group_header=True), "hide_group_header"),
        (lambda d: d["consumers"][1]["acls"][0].update(group=""), "group"),
        (lambda d: d["plugins"].append({"name": "acl", "consumer": "cxr-admin", "config": ACL_ADMIN}), "consumer"),
    ],
)
def test_bad_kong_yml_fails_naming_the_field(raw, mutate, message):
    data = copy.deepcopy(raw)
    mutate(data)
    with pytest.raises(KongConfigError, match=message):
        validate(data)


# ------------------------------------------------------------------ contract: kong.yml == annotations
def _rest_routes(kong):
    """The routes transcoded to gRPC (the grpc-gateway plugin), not the plain-HTTP ones (STOW-RS)."""
    for svc in kong.services:
        for r in svc.routes:
            if "http" in r.protocols and svc.protocol in ("grpc", "grpcs"):
                yield svc, r


def test_stow_rs_route_is_plain_http_behind_key_auth_acl_rate_and_size_limits(raw):
    kong = validate(raw)
    policies = Policies(kong)
    hit = policies.match_http("POST", "/dicom-web/studies")
    assert hit is not None and (hit.service.name, hit.route.name) == ("dicom-stow", "dicom-stow-rs")
    svc = hit.service
    assert (svc.protocol, svc.host, svc.port) == ("http", ENV["DECK_DICOM_HOST"], int(ENV["DECK_DICOM_STOW_PORT"]))
    assert kong.upstream(svc.host) is None and hit.route.request_buffering is False
    assert policies.grpc_gateway_proto(hit) is None
    assert policies.key_auth(hit) is policies.key_auth(policies.match_grpc("/cxr.rag.v1.RagService/X"))
    assert policies.rate_limiter(hit).config.minute == 100
    assert policies.size_limit(hit).limit == 512 * 1024 * 1024  # the node's stow_max_request_mb default
    assert policies.acl(hit).config.allow == [INFERENCE_GROUP]
    for method, path in (("GET", "/dicom-web/studies"), ("POST", "/dicom-web/studies/1.2.3"), ("POST", "/dicom-web")):
        assert policies.match_http(method, path) is None, (method, path)


def test_every_http_annotation_has_a_rest_route_in_kong_yml(raw, catalog):
    kong = validate(raw)
    policies = Policies(kong)
    annotated = catalog.annotated()
    assert len(annotated) >= 13
    for rpc in annotated:
        for b in rpc.bindings:
            path = b.template.example()
            hit = policies.match_http(b.method, path)
            assert hit is not None, f"{rpc.full_method}: no kong.yml route for {b.method} {b.template.template}"
            proto = policies.grpc_gateway_proto(hit)
            assert proto is not None, f"route {hit.route.name} has no grpc-gateway plugin"
            m = match_rest(catalog.for_proto_file(proto), b.method, path)
            assert m is not None and m.rpc is rpc, f"route {hit.route.name} does not reach {rpc.full_method}"
            assert hit.service.name == rpc.service.split(".")[1]


def test_every_rest_route_resolves_to_exactly_one_real_rpc(raw, catalog):
    kong = validate(raw)
    for svc, route in _rest_routes(kong):
        proto = kong.plugin_for("grpc-gateway", svc, route).config.proto
        assert proto.endswith(".proto")
        rpcs = catalog.for_proto_file(proto)
        assert all(r.service.startswith(f"cxr.{svc.name}.") for r in rpcs)
        reached = []
        for rpc in rpcs:
            for b in rpc.bindings:
                path = b.template.example()
                if b.method in route.methods and any(re.match(p[1:], path) for p in route.paths):
                    reached.append(rpc.full_method)
        assert len(reached) == 1, f"route {route.name} reaches {reached}"


def test_every_grpc_service_has_a_grpc_route(raw, catalog):
    kong = validate(raw)
    policies = Policies(kong)
    services = {r.service for r in catalog.rpcs.values() if r.service.startswith("cxr.")}
    assert services == {
        "cxr.classification.v1.ClassificationService",
        "cxr.segmentation.v1.SegmentationService",
        "cxr.rag.v1.RagService",
        "cxr.dicom.v1.DicomService",
    }
    for rpc in catalog.rpcs.values():
        if rpc.service in services:
            hit = policies.match_grpc(rpc.full_method)
            assert hit is not None and hit.service.name == rpc.service.split(".")[1]
    for svc in kong.services:
        for r in svc.routes:
            if "grpc" in r.protocols:
                assert any(m.startswith(p) for p in r.paths for m in catalog.rpcs), f"{r.name} reaches no RPC"


def _allowed_groups(policies: Policies, hit) -> set[str]:
    acl = policies.acl(hit)
    assert acl is not None and acl.config.allow is not None, f"route {hit.route.name} has no acl allow list"
    return set(acl.config.allow)


VERSIONED = [("classification", "Classification"), ("segmentation", "Segmentation")]


def test_admin_rpcs_are_acl_restricted_to_the_admin_group(raw, catalog):
    """Every route (REST and gRPC) that reaches an admin RPC allows the admin group only; every other
    cxr RPC allows both groups. The admin set comes from the descriptor set by RPC name."""
    kong = validate(raw)
    policies = Policies(kong)
    admin = admin_methods(catalog)
    assert admin == {
        "/cxr.classification.v1.ClassificationService/LoadModel",
        "/cxr.classification.v1.ClassificationService/UnloadModel",
        "/cxr.classification.v1.ClassificationService/RecordModelEvaluation",
        "/cxr.segmentation.v1.SegmentationService/LoadModel",
        "/cxr.segmentation.v1.SegmentationService/UnloadModel",
        "/cxr.segmentation.v1.SegmentationService/RecordModelEvaluation",
        "/cxr.rag.v1.RagService/IngestDocuments",
        "/cxr.dicom.v1.DicomService/RetryDeadLetter",
    } | {
        f"/cxr.{s}.v1.{S}Service/{m}"
        for s, S in VERSIONED
        for m in ("PromoteModel", "RollbackModel", "SetModelRouting")
    }
    checked = 0
    for method, rpc in catalog.rpcs.items():
        if not rpc.service.startswith("cxr."):
            continue
        want = {ADMIN_GROUP} if method in admin else {INFERENCE_GROUP, ADMIN_GROUP}
        hits = [policies.match_grpc(method)]
        hits += [policies.match_http(b.method, b.template.example()) for b in rpc.bindings]
        for hit in hits:
            assert hit is not None
            assert _allowed_groups(policies, hit) == want, f"{method} via route {hit.route.name}"
            checked += 1
    assert checked == 53  # 27 RPCs over gRPC + 26 REST bindings
    # every route whose path reaches an admin RPC, by Kong's own matching of that route alone
    for svc in kong.services:
        for r in svc.routes:
            hit = RouteHit(svc, r)
            reached = set()
            for method, rpc in catalog.rpcs.items():
                if "grpc" in r.protocols and any(method == p or method.startswith(p) for p in r.paths or []):
                    if policies.match_grpc(method) == hit:  # a longer route wins in Kong's router
                        reached.add(method)
                for b in rpc.bindings if "http" in r.protocols else []:
                    if b.method in (r.methods or []) and any(re.match(p[1:], b.template.example()) for p in r.paths):
                        reached.add(method)
            if reached & admin:
                assert reached <= admin and _allowed_groups(policies, hit) == {ADMIN_GROUP}, r.name
    assert unprotected_admin_routes(kong, catalog) == []
    groups = {c.name: c.groups for c in kong.consumers}
    assert groups == {"cxr-client": [INFERENCE_GROUP], "cxr-admin": [ADMIN_GROUP]}
    assert all(p.config.hide_groups_header is False for p in kong.all_plugins() if p.name == "acl")


def test_an_open_admin_route_is_found_and_refused_by_check(raw, catalog, tmp_path):
    data = copy.deepcopy(raw)
    cls = data["services"][0]
    cls["routes"] = [r for r in cls["routes"] if r["name"] != "classification-grpc-admin"]
    for r in data["services"][2]["routes"]:
        if r["name"] == "rag-rest-ingest-documents":
            r["plugins"] = [p for p in r["plugins"] if p["name"] != "acl"]
    assert unprotected_admin_routes(validate(data), catalog) == [
        "/cxr.classification.v1.ClassificationService/LoadModel via route classification-grpc",
        "/cxr.classification.v1.ClassificationService/PromoteModel via route classification-grpc",
        "/cxr.classification.v1.ClassificationService/RecordModelEvaluation via route classification-grpc",
        "/cxr.classification.v1.ClassificationService/RollbackModel via route classification-grpc",
        "/cxr.classification.v1.ClassificationService/SetModelRouting via route classification-grpc",
        "/cxr.classification.v1.ClassificationService/UnloadModel via route classification-grpc",
        "/cxr.rag.v1.RagService/IngestDocuments via route rag-rest-ingest-documents",
    ]
    text = KONG_YML.read_text()  # without the rag-grpc-admin route (the last route of rag)
    bad = tmp_path / "kong.yml"
    bad.write_text(text[: text.index("      - name: rag-grpc-admin")] + text[text.index("\nupstreams:") :])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_gateway",
            "--kong",
            str(bad),
            "--config",
            "config/local.json",
            "--check",
            "--descriptor",
            str(DESCRIPTOR),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "/cxr.rag.v1.RagService/IngestDocuments via route rag-grpc" in out.stderr


def test_admin_methods_follow_the_access_option_when_the_protos_declare_it():
    """A descriptor set with `(cxr.common.v1.access)`: the option decides, not the method name."""
    from google.protobuf import descriptor_pb2

    access = descriptor_pb2.FileDescriptorProto(
        name="cxr/common/v1/access.proto",
        package="cxr.common.v1",
        syntax="proto3",
        dependency=["google/protobuf/descriptor.proto"],
    )
    enum = access.enum_type.add(name="Access")
    for i, n in enumerate(("ACCESS_UNSPECIFIED", "ACCESS_INFERENCE", "ACCESS_ADMIN")):
        enum.value.add(name=n, number=i)
    access.extension.add(
        name="access",
        number=50001,
        label=1,
        type=14,
        type_name=".cxr.common.v1.Access",
        extendee=".google.protobuf.MethodOptions",
    )
    svc_file = descriptor_pb2.FileDescriptorProto(
        name="cxr/x/v1/x.proto", package="cxr.x.v1", syntax="proto3", dependency=[access.name]
    )
    svc_file.message_type.add(name="M")
    svc = svc_file.service.add(name="XService")
    for name, value in (("LoadModel", None), ("Wipe", 2), ("Peek", 1)):
        m = svc.method.add(name=name, input_type=".cxr.x.v1.M", output_type=".cxr.x.v1.M")
        if value is not None:
            m.options.MergeFromString(bytes([0x88, 0xB5, 0x18, value]))  # field 50001, varint
    fds = descriptor_pb2.FileDescriptorSet(
        file=[descriptor_pb2.FileDescriptorProto.FromString(descriptor_pb2.DESCRIPTOR.serialized_pb), access, svc_file]
    )
    assert admin_methods(ProtoCatalog.from_bytes(fds.SerializeToString())) == {"/cxr.x.v1.XService/Wipe"}
    # without the option declared, the names decide
    fds = descriptor_pb2.FileDescriptorSet(file=[svc_file])
    del fds.file[0].dependency[:]
    assert admin_methods(ProtoCatalog.from_bytes(fds.SerializeToString())) == {"/cxr.x.v1.XService/LoadModel"}


def test_acl_decisions_and_refusal_status():
    inference = kong_model.Consumer(username="c", acls=[{"group": "inference"}])
    admin = kong_model.Consumer(username="a", acls=[{"group": "admin"}])
    admin_only = Acl(kong_model.AclConfig(allow=["admin"]))
    denial = admin_only.check(inference, "classification-grpc-admin")
    assert (denial.http_status, denial.grpc_code, denial.message) == (
        403,
        grpc.StatusCode.PERMISSION_DENIED,
        "You cannot consume this service",
    )
    st = denial.status()
    info = error_info(st)
    assert (info.reason, info.domain) == ("ADMIN_REQUIRED", "cxr.platform")
    assert info.metadata["route"] == "classification-grpc-admin" and info.metadata["consumer"] == "c"
    assert st.code == 7 and denial.body()["details"][0]["reason"] == "ADMIN_REQUIRED"
    assert dict(denial.trailers())["grpc-status-details-bin"] == st.SerializeToString()
    assert admin_only.check(admin) == "admin"  # X-Consumer-Groups
    assert Acl(kong_model.AclConfig(allow=["admin"], hide_groups_header=True)).check(admin) == ""
    both = Acl(kong_model.AclConfig(allow=["inference", "admin"]))
    assert both.check(inference) == "inference"
    nobody = kong_model.Consumer(username="n")
    assert error_info(both.check(nobody).status()).reason == "GROUP_NOT_ALLOWED"
    assert Acl(kong_model.AclConfig(deny=["inference"])).check(inference).http_status == 403
    assert Acl(kong_model.AclConfig(deny=["inference"])).check(admin) == "admin"
    assert both.check(None).http_status == 401  # no authenticated consumer


def test_local_defaults_admin_key_or_a_locked_one():
    from cxr_gateway.local import LOCKED_PREFIX, local_defaults
    from cxr_serving.settings import Settings

    a, b = local_defaults(Settings()), local_defaults(Settings())
    assert a["DECK_CXR_ADMIN_API_KEY"].startswith(LOCKED_PREFIX)
    assert a["DECK_CXR_ADMIN_API_KEY"] != b["DECK_CXR_ADMIN_API_KEY"]  # random: nobody can use it


def test_helm_chart_ships_this_kong_yml():
    chart_copy = REPO / "deploy" / "helm" / "cxr" / "files" / "kong.yml"
    if not chart_copy.exists():
        pytest.skip("no Helm chart copy of kong.yml")
    assert chart_copy.read_text() == KONG_YML.read_text()


# ------------------------------------------------------------------ path templates and transcoding
def test_path_templates():
    t = PathTemplate.parse("/v1/classification/models/{model_name}:load")
    assert t.match("/v1/classification/models/densenet121:load") == {"model_name": "densenet121"}
    assert t.match("/v1/classification/models/a%2Fb:load") == {"model_name": "a/b"}
    assert t.match("/v1/classification/models/x:unload") is None
    assert t.match("/v1/classification/models/a/b:load") is None
    assert PathTemplate.parse("/v1/rag:answerQuestion").match("/v1/rag:answerQuestion") == {}
    assert PathTemplate.parse("/v1/rag:answerQuestion").match("/v1/rag") is None
    deep = PathTemplate.parse("/v1/{name=projects/*/docs/**}")
    assert deep.match("/v1/projects/p1/docs/a/b") == {"name": "projects/p1/docs/a/b"}


def test_request_message_body_path_and_query(catalog):
    load = catalog.rpcs["/cxr.classification.v1.ClassificationService/LoadModel"]
    m = match_rest([load], "POST", "/v1/classification/models/dn:load")
    msg = request_message(load, m.binding, m.path_params, [], b'{"modelName": "ignored", "checkpointPath": "/c.pt"}')
    assert (msg.model_name, msg.checkpoint_path) == ("dn", "/c.pt")  # path variable wins over the body
    search = catalog.rpcs["/cxr.rag.v1.RagService/SearchLiterature"]
    b = search.bindings[0]
    msg = request_message(search, b, {}, [], b'{"query": "q", "topK": 3, "mode": "RETRIEVAL_MODE_HYBRID", "x": 1}')
    assert (msg.query, msg.top_k, msg.mode) == ("q", 3, 3)  # unknown field discarded
    with pytest.raises(TranscodeError):
        request_message(search, b, {}, [], b'{"topK": "many"}')
    with pytest.raises(TranscodeError):
        request_message(search, b, {}, [], b"[1, 2]")
    classify = catalog.rpcs["/cxr.classification.v1.ClassificationService/ClassifyImage"]
    msg = request_message(classify, classify.bindings[0], {}, [], b'{"image": {"data": "iVBORw=="}}')
    assert msg.image.data == b"\x89PNG"
    out = response_json(msg)
    assert out["image"]["data"] == "iVBORw==" and out["model_names"] == []


def test_query_parameters_for_get_bindings():
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto(name="q.proto", package="q", syntax="proto3")
    inner = fdp.message_type.add(name="Inner")
    inner.field.add(name="flag", number=1, type=8, label=1)
    req = fdp.message_type.add(name="Req")
    req.field.add(name="name", number=1, type=9, label=1)
    req.field.add(name="tags", number=2, type=9, label=3)
    req.field.add(name="inner", number=3, type=11, label=1, type_name=".q.Inner")
    svc = fdp.service.add(name="S")
    method = svc.method.add(name="Get", input_type=".q.Req", output_type=".q.Req")
    from google.api import annotations_pb2, http_pb2

    method.options.Extensions[annotations_pb2.http].CopyFrom(http_pb2.HttpRule(get="/v1/things/{name}"))
    fds = descriptor_pb2.FileDescriptorSet(file=[fdp])
    cat = ProtoCatalog.from_bytes(fds.SerializeToString())
    rpc = cat.rpcs["/q.S/Get"]
    m = match_rest([rpc], "GET", "/v1/things/x1")
    msg = request_message(rpc, m.binding, m.path_params, [("tags", "a"), ("tags", "b"), ("inner.flag", "true")], b"")
    assert (msg.name, list(msg.tags), msg.inner.flag) == ("x1", ["a", "b"], True)
    with pytest.raises(TranscodeError, match="unknown field"):
        request_message(rpc, m.binding, m.path_params, [("nope", "1")], b"")


def test_status_mapping_matches_grpc_gateway():
    expected = {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "UNAUTHENTICATED": 401,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
    }
    assert {c.name: s for c, s in HTTP_STATUS_BY_CODE.items()} == expected
    assert set(HTTP_STATUS_BY_CODE) == set(grpc.StatusCode)


def test_error_body_carries_error_info():
    code, status = status_for_exception(InvalidInputError("image: empty", reason="IMAGE_EMPTY"))
    body = error_from_rpc(code, "image: empty", trailing_metadata(status))
    assert body["code"] == 3 and body["message"] == "image: empty"
    detail = body["details"][0]
    assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (detail["reason"], detail["domain"]) == ("IMAGE_EMPTY", "cxr.platform")
    assert error_from_rpc(grpc.StatusCode.UNAVAILABLE, "down", None) == {"code": 14, "message": "down", "details": []}


# ------------------------------------------------------------------ plugins in isolation
def test_rate_limiter_windows_headers_and_reset():
    now = [1020.0]  # the start of a minute
    cfg = kong_model.RateLimitingConfig(second=2, minute=3)
    rl = RateLimiter(cfg, clock=lambda: now[0])
    d1 = rl.hit("c")
    assert d1.allowed and d1.headers["X-RateLimit-Remaining-Second"] == "1"
    assert d1.headers["X-RateLimit-Remaining-Minute"] == "2"
    assert d1.headers["RateLimit-Remaining"] == "1" and d1.headers["RateLimit-Limit"] == "2"
    assert rl.hit("c").allowed
    d3 = rl.hit("c")  # third in the same second
    assert not d3.allowed and d3.denial.http_status == 429 and d3.headers["Retry-After"] == "1"
    assert rl.hit("other").allowed  # counters are per identifier
    now[0] += 1.0
    d4 = rl.hit("c")  # new second; minute has one left
    assert d4.allowed and d4.headers["X-RateLimit-Remaining-Minute"] == "0"
    d5 = rl.hit("c")
    assert not d5.allowed and int(d5.headers["Retry-After"]) == 59
    now[0] += 60
    assert rl.hit("c").allowed


def test_key_auth_size_limit_and_correlation_id(raw):
    kong = validate(raw)
    ka = KeyAuth(kong.global_plugin("key-auth").config, kong.consumers)
    assert ka.authenticate({}).message == "No API key found in request"
    assert ka.authenticate({"apikey": "nope"}).message == "Invalid authentication credentials"
    assert ka.authenticate({"x-api-key": "k-123"}).name == "cxr-client"
    assert ka.authenticate({}, {"apikey": "k-123"}).name == "cxr-client"  # key_in_query (Kong's default)
    size = SizeLimit(kong.global_plugin("request-size-limiting").config)
    assert size.check_declared(50 * 1024 * 1024) is None
    assert size.check_declared(50 * 1024 * 1024 + 1).http_status == 413
    corr = CorrelationId(kong.global_plugin("correlation-id").config)
    assert corr.get_or_create({"x-correlation-id": "given"}) == "given"
    assert corr.get_or_create({}) != corr.get_or_create({})


def test_openapi_covers_every_annotation(catalog):
    doc = build_openapi(catalog)
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    for rpc in catalog.annotated():
        for b in rpc.bindings:
            assert (b.method, b.template.template) in ops
    schemas = doc["components"]["schemas"]
    req = schemas["cxr.classification.v1.ClassifyImageRequest"]["properties"]
    assert req["model_names"] == {"type": "array", "items": {"type": "string"}}
    assert schemas["cxr.common.v1.Image"]["properties"]["data"]["format"] == "byte"
    assert schemas["cxr.rag.v1.AnswerQuestionRequest"]["properties"]["filters"]["type"] == "object"
    assert "RETRIEVAL_MODE_HYBRID" in schemas["cxr.rag.v1.RetrievalMode"]["enum"]
    json.dumps(doc)  # serialisable


def test_cli_check_render_and_local_defaults(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cxr_gateway", "--kong", str(KONG_YML), "--config", "config/local.json", "--render"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "DECK_RAG_PORT": "6000", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)
    targets = {u["name"]: u["targets"][0]["target"] for u in rendered["upstreams"]}
    assert targets == {
        "classification.upstream": "127.0.0.1:50051",
        "segmentation.upstream": "127.0.0.1:50052",
        "rag.upstream": "127.0.0.1:6000",  # the environment wins over config/local.json
        "dicom.upstream": "127.0.0.1:50055",
    }
    assert rendered["consumers"][0]["keyauth_credentials"][0]["key"] == "dev-key-change-me"
    bad = tmp_path / "kong.yml"
    bad.write_text(KONG_YML.read_text().replace("minute: 100", "minutes: 100"))
    out = subprocess.run(
        [sys.executable, "-m", "cxr_gateway", "--kong", str(bad), "--config", "config/local.json", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "minutes" in out.stderr


def test_load_kong_helper_points_at_given_ports():
    kong = load_kong({"classification": 1234})
    assert kong.upstream("classification.upstream").targets[0].target == "127.0.0.1:1234"


def test_plugin_options_hide_credentials_identifiers_411_and_counter():
    ka = KeyAuth(kong_model.KeyAuthConfig(key_names=["apikey"], hide_credentials=True), [])
    headers = {"apikey": "k", "other": "v"}
    ka.strip(headers)
    assert headers == {"other": "v"}
    rl = RateLimiter(kong_model.RateLimitingConfig(minute=1))
    consumer = kong_model.Consumer(username="alice")
    assert rl.identifier(consumer, "10.0.0.1", "rag", "/p") == "consumer:alice"
    assert rl.identifier(None, "10.0.0.1", "rag", "/p") == "ip:10.0.0.1"  # Kong's fallback without a consumer
    by_service = RateLimiter(kong_model.RateLimitingConfig(minute=1, limit_by="service"))
    assert by_service.identifier(consumer, "10.0.0.1", "rag", "/p") == "service:rag"
    strict = SizeLimit(kong_model.RequestSizeLimitingConfig(allowed_payload_size=1, require_content_length=True))
    assert strict.check_declared(None).http_status == 411
    assert SizeLimit(kong_model.RequestSizeLimitingConfig(allowed_payload_size=2, size_unit="kilobytes")).limit == 2048
    counter = CorrelationId(kong_model.CorrelationIdConfig(generator="uuid#counter"))
    a, b = counter.get_or_create({}), counter.get_or_create({})
    assert a.endswith("#1") and b.endswith("#2") and a.split("#")[0] == b.split("#")[0]


def test_passive_health_marks_target_down_after_threshold():
    from cxr_gateway.upstreams import Backend, BackendUnavailable, TargetState

    checks = kong_model.Healthchecks.model_validate({"passive": {"unhealthy": {"tcp_failures": 2, "timeouts": 1}}})
    svc = kong_model.Service(name="rag", protocol="grpc", host="rag.upstream", port=1)
    target = TargetState("127.0.0.1:1", channel=None)
    backend = Backend(svc, [target], checks, "rag.upstream")
    backend.record_failure(target, "tcp", "refused")
    assert backend.pick() is target  # one failure is under the threshold
    backend.record_success(target)  # a success resets the count
    backend.record_failure(target, "tcp", "refused")
    assert target.healthy
    backend.record_failure(target, "tcp", "refused")
    assert not target.healthy
    with pytest.raises(BackendUnavailable, match="backend 'rag' is unavailable: no healthy target"):
        backend.pick()
    other = TargetState("127.0.0.1:2", channel=None)
    Backend(svc, [other], checks, "rag.upstream").record_failure(other, "timeout", "deadline")
    assert not other.healthy


def test_event_loop_flag():
    from cxr_gateway.__main__ import _args

    assert _args([]).event_loop == "auto"
    assert _args(["--event-loop", "asyncio"]).event_loop == "asyncio"


def test_the_fallback_admin_rpc_names_are_the_rpcs_the_protos_mark_admin():
    """The gateway's list for a descriptor set without the access option cannot drift from the protos."""
    from cxr_serving.roles import platform_admin_methods

    assert {m.rsplit("/", 1)[1] for m in platform_admin_methods()} == ADMIN_RPC_NAMES
