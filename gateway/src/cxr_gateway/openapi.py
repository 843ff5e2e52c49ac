"""An OpenAPI 3.0 document of the REST routes, generated from the descriptor set.

One operation per `google.api.http` binding (path variables become path parameters, GET
fields query parameters, `body: "*"` the request body); schemas follow the proto3 JSON
mapping that the gateway speaks (.proto field names, 64-bit integers as strings, bytes as
base64, enums as names, maps as objects, non-finite floats as "NaN"/"Infinity"/"-Infinity").
Errors are google.rpc.Status. Server-streaming RPCs answer newline-delimited JSON, one
`{"result": ...}` per message.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from cxr_gateway.routes import ProtoCatalog, RpcInfo
from cxr_gateway.transcoding import is_repeated, message_type

_VAR_RE = re.compile(r"\{([a-zA-Z_][\w.]*)(?:=[^}]*)?\}")
F = FieldDescriptor
# proto3 JSON writes a non-finite float or double as one of these strings (e.g. a NaN threshold: no operating point)
_NON_FINITE: dict[str, Any] = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"oneOf": [{"type": "number", "format": "double"}, _NON_FINITE]},
    F.TYPE_FLOAT: {"oneOf": [{"type": "number", "format": "float"}, _NON_FINITE]},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def message(self, d: Descriptor) -> dict[str, Any]:
        name = d.full_name
        if name in _WELL_KNOWN:
            self.schemas.setdefault(name, _WELL_KNOWN[name])
            return _ref(name)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursion-safe
            props = {f.name: self.field(f) for f in d.fields}
            self.schemas[name] = {"type": "object", "properties": props}
        return _ref(name)

    def enum(self, e: EnumDescriptor) -> dict[str, Any]:
        if e.full_name not in self.schemas:
            self.schemas[e.full_name] = {"type": "string", "enum": [v.name for v in e.values]}
        return _ref(e.full_name)

    def single(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.type == F.TYPE_MESSAGE:
            return self.message(message_type(f))
        if f.type == F.TYPE_ENUM and f.enum_type is not None:
            return self.enum(f.enum_type)
        return dict(_SCALARS[f.type])

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.type == F.TYPE_MESSAGE and message_type(f).GetOptions().map_entry:
            value = message_type(f).fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if is_repeated(f):
            return {"type": "array", "items": self.single(f)}
        return self.single(f)


def _operation(rpc: RpcInfo, method: str, template: str, body: str, s: _Schemas) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    path_vars = _VAR_RE.findall(template)
    for var in path_vars:
        params.append({"name": var, "in": "path", "required": True, "schema": {"type": "string"}})
    if not body:
        for f in rpc.input.fields:
            if f.name in path_vars or f.type == F.TYPE_MESSAGE:
                continue
            params.append({"name": f.name, "in": "query", "required": False, "schema": s.field(f)})
    op: dict[str, Any] = {
        "operationId": f"{rpc.service.rsplit('.', 1)[-1]}_{rpc.name}",
        "tags": [rpc.service],
        "summary": f"{rpc.full_method}",
        "parameters": params,
        "security": [{"apikey": []}, {"x-api-key": []}],
        "responses": {
            "200": {
                "description": (
                    'newline-delimited JSON, one {"result": <message>} per streamed message'
                    if rpc.server_streaming
                    else "OK"
                ),
                "content": {"application/json": {"schema": s.message(rpc.output)}},
            },
            "default": {
                "description": "error (google.rpc.Status)",
                "content": {"application/json": {"schema": _ref("google.rpc.Status")}},
            },
        },
    }
    if body:
        schema = s.message(rpc.input) if body == "*" else s.field(rpc.input.fields_by_name[body])
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return op


def build_openapi(catalog: ProtoCatalog) -> dict[str, Any]:
    s = _Schemas()
    s.schemas["google.rpc.Status"] = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
        },
    }
    paths: dict[str, dict[str, Any]] = {}
    for rpc in sorted(catalog.annotated(), key=lambda r: r.full_method):
        for b in rpc.bindings:
            openapi_path = _VAR_RE.sub(lambda m: "{" + m.group(1) + "}", b.template.template)
            paths.setdefault(openapi_path, {})[b.method.lower()] = _operation(
                rpc, b.method, b.template.template, b.body, s
            )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cxr REST API",
            "version": "v1",
            "description": "REST mapping of the cxr gRPC services (google.api.http annotations), served by Kong's "
            "grpc-gateway plugin; generated from gateway/protos.pb. Not for diagnosis.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(s.schemas.items())),
            "securitySchemes": {
                "apikey": {"type": "apiKey", "in": "header", "name": "apikey"},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
