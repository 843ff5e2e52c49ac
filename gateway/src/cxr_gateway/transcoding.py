"""JSON ↔ protobuf for REST calls, and gRPC status → HTTP status as grpc-gateway maps it.

Request: the body (`body: "*"` → the whole message, `body: "field"` → that field), then path
variables, then (for fields not bound by body or path) query parameters — grpc-gateway's
order; unknown JSON fields are discarded, as grpc-gateway's default unmarshaler does.
Response: protojson with the .proto field names (snake_case, as Kong's grpc-gateway plugin and
grpc-gateway's `UseProtoNames` emit them) and unpopulated fields emitted; requests accept both
the .proto names and lowerCamelCase JSON names. Errors: `{"code", "message", "details"}` — a google.rpc.Status as
JSON, with `details` from the backend's `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from cxr_gateway.routes import HttpBinding, RpcInfo

_ = error_details_pb2  # registers ErrorInfo & co. so Status.details render as JSON

# runtime.HTTPStatusFromCode in grpc-gateway v2
HTTP_STATUS_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class TranscodeError(ValueError):
    """The HTTP request cannot become the RPC's request message (→ 400 INVALID_ARGUMENT)."""


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS_BY_CODE.get(code, 500)


def code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def error_body(code: grpc.StatusCode, message: str, details: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"code": code_number(code), "message": message, "details": list(details)}


def error_from_rpc(code: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, Any]] | None) -> dict[str, Any]:
    """grpc-gateway's error body, with details decoded from the status trailer when present."""
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                st = status_pb2.Status.FromString(value)
            except DecodeError:
                break
            if st.code == code_number(code):
                d = json_format.MessageToDict(st, always_print_fields_with_no_presence=True)
                return error_body(code, st.message or message, d.get("details", []))
    return error_body(code, message)


def request_message(
    rpc: RpcInfo, binding: HttpBinding, path_params: dict[str, str], query: Iterable[tuple[str, str]], body: bytes
) -> Message:
    msg = rpc.new_request()
    bound: set[str] = set(path_params)
    if binding.body:
        data = _json_object(body)
        if binding.body == "*":
            _parse_into(data, msg)
        else:
            _parse_into({binding.body: data}, msg)
            bound.add(binding.body)
    if path_params:
        _parse_into(_nest(rpc.input, path_params.items()), msg)
    if binding.body != "*":
        items = [(k, v) for k, v in query if k.split(".")[0] not in bound]
        if items:
            _parse_into(_nest(rpc.input, items), msg)
    return msg


def response_json(msg: Message, response_body: str = "") -> Any:
    d = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
    if response_body:
        return d.get(response_body, None)
    return d


def _json_object(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TranscodeError(f"request body is not valid JSON: {exc}") from None


def _parse_into(data: Any, msg: Message) -> None:
    if not isinstance(data, dict):
        raise TranscodeError(f"request body must be a JSON object for {msg.DESCRIPTOR.full_name}")
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise TranscodeError(str(exc)) from None


def _nest(desc: Descriptor, items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`a.b=1&c=2&c=3` → {"a": {"b": "1"}, "c": ["2", "3"]}, checking each name against the message."""
    out: dict[str, Any] = {}
    for dotted, value in items:
        node, d = out, desc
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            f = d.fields_by_name.get(part) or next((x for x in d.fields if x.json_name == part), None)
            if f is None:
                raise TranscodeError(f"unknown field {dotted!r} in {desc.full_name}")
            last = i == len(parts) - 1
            if not last:
                if f.type != FieldDescriptor.TYPE_MESSAGE:
                    raise TranscodeError(f"field {dotted!r}: {part} is not a message")
                node = node.setdefault(f.name, {})
                d = message_type(f)
            elif is_repeated(f):
                node.setdefault(f.name, []).append(_scalar(f, value, dotted))
            else:
                node[f.name] = _scalar(f, value, dotted)
    return out


def _scalar(f: FieldDescriptor, value: str, name: str) -> Any:
    """URL strings to the JSON types json_format expects (integers may stay strings: proto3 JSON allows it)."""
    if f.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise TranscodeError(f"field {name!r}: {value!r} is not a boolean")
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        try:
            return float(value)
        except ValueError:
            raise TranscodeError(f"field {name!r}: {value!r} is not a number") from None
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        raise TranscodeError(f"field {name!r} is a message: set its fields with {name}.<field>")
    return value


def is_repeated(f: FieldDescriptor) -> bool:
    if hasattr(f, "is_repeated"):  # protobuf >= 6
        return bool(f.is_repeated)
    legacy: Any = f  # protobuf 5 has `label` instead, which the protobuf >= 6 stubs no longer declare
    return bool(legacy.label == FieldDescriptor.LABEL_REPEATED)


def message_type(f: FieldDescriptor) -> Descriptor:
    """The message type of a message field (the stubs allow None, which only other fields have)."""
    if f.message_type is None:
        raise TranscodeError(f"field {f.full_name} is not a message")
    return f.message_type
