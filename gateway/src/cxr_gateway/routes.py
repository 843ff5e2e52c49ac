"""REST routes derived from the `google.api.http` annotations in the descriptor set.

`gateway/protos.pb` (built by `make generate`) is a FileDescriptorSet with imports and source
info. Each annotated method gives one `HttpRule`: a verb, a path template
(`/v1/classification/models/{model_name}:load`) and a body selector (`"*"`, a field, or none).
Templates follow google/api/http.proto: literal segments, `{field}` (one segment),
`{field=pattern}` with `*` (one segment) and `**` (the rest), and a trailing `:verb`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

HTTP_VERBS = ("get", "put", "post", "delete", "patch")
_VAR_RE = re.compile(r"\{([a-zA-Z_][\w.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class PathTemplate:
    template: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        if not template.startswith("/"):
            raise ValueError(f"path template {template!r} must start with '/'")
        path, verb = template, ""
        last = template.rsplit("/", 1)[-1]
        if ":" in _VAR_RE.sub("", last):
            # the verb is after the last ':' that is outside a {variable}
            idx = template.rfind(":")
            path, verb = template[:idx], template[idx + 1 :]
        out = ["^"]
        variables: list[str] = []
        pos = 0
        for m in _VAR_RE.finditer(path):
            out.append(re.escape(path[pos : m.start()]))
            name, pattern = m.group(1), m.group(2) or "*"
            variables.append(name)
            out.append(f"(?P<v{len(variables) - 1}>{_segment_regex(pattern)})")
            pos = m.end()
        out.append(re.escape(path[pos:]))
        if verb:
            out.append(re.escape(":" + verb))
        out.append("$")
        return cls(template, re.compile("".join(out)), tuple(variables))

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.match(path)
        if m is None:
            return None
        return {name: unquote(m.group(f"v{i}")) for i, name in enumerate(self.variables)}

    def example(self) -> str:
        """The template with each variable replaced by a sample segment (for contract tests)."""
        return _VAR_RE.sub(lambda m: "sample", self.template)


def _segment_regex(pattern: str) -> str:
    parts = []
    for seg in pattern.split("/"):
        if seg == "**":
            parts.append(".+")
        elif seg == "*":
            parts.append("[^/]+?")
        else:
            parts.append(re.escape(seg))
    return "/".join(parts)


@dataclass(frozen=True)
class HttpBinding:
    method: str  # GET, POST, ...
    template: PathTemplate
    body: str  # "" (none), "*" or a field name
    response_body: str


@dataclass
class RpcInfo:
    service: str  # full name, e.g. cxr.classification.v1.ClassificationService
    name: str  # ClassifyImage
    proto_file: str  # cxr/classification/v1/classification_service.proto
    input: Descriptor
    output: Descriptor
    client_streaming: bool
    server_streaming: bool
    bindings: list[HttpBinding] = field(default_factory=list)

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.name}"

    def new_request(self) -> Message:
        return message_factory.GetMessageClass(self.input)()

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.output)


@dataclass
class ProtoCatalog:
    """Every service method in a descriptor set, with its HTTP bindings."""

    pool: descriptor_pool.DescriptorPool
    rpcs: dict[str, RpcInfo]  # by full method "/pkg.Service/Method"
    files: list[str]

    @classmethod
    def load(cls, path: str | Path) -> ProtoCatalog:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> ProtoCatalog:
        # annotations_pb2 is imported above, so the google.api.http extension parses in place
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:
            pool.Add(f)
        rpcs: dict[str, RpcInfo] = {}
        for f in fds.file:
            for svc in f.service:
                full_svc = f"{f.package}.{svc.name}" if f.package else svc.name
                sdesc = pool.FindServiceByName(full_svc)
                for m in svc.method:
                    md: MethodDescriptor = sdesc.methods_by_name[m.name]
                    info = RpcInfo(
                        service=full_svc,
                        name=m.name,
                        proto_file=f.name,
                        input=md.input_type,
                        output=md.output_type,
                        client_streaming=m.client_streaming,
                        server_streaming=m.server_streaming,
                    )
                    if m.options.HasExtension(annotations_pb2.http):
                        info.bindings = _bindings(m.options.Extensions[annotations_pb2.http])
                    rpcs[info.full_method] = info
        return cls(pool, rpcs, [f.name for f in fds.file])

    def annotated(self) -> list[RpcInfo]:
        return [r for r in self.rpcs.values() if r.bindings]

    def for_proto_file(self, proto_path: str) -> list[RpcInfo]:
        """RPCs of the file that Kong's grpc-gateway `config.proto` names (matched by path suffix)."""
        name = next((f for f in self.files if proto_path == f or proto_path.endswith("/" + f)), None)
        if name is None:
            raise KeyError(f"proto {proto_path!r} is not in the descriptor set")
        return [r for r in self.rpcs.values() if r.proto_file == name]


def _bindings(rule: http_pb2.HttpRule) -> list[HttpBinding]:
    out: list[HttpBinding] = []
    for r in [rule, *rule.additional_bindings]:
        pattern = r.WhichOneof("pattern")
        if pattern is None:
            continue
        if pattern == "custom":
            method, path = r.custom.kind.upper(), r.custom.path
        else:
            method, path = pattern.upper(), getattr(r, pattern)
        out.append(HttpBinding(method, PathTemplate.parse(path), r.body, r.response_body))
    return out


@dataclass(frozen=True)
class RestMatch:
    rpc: RpcInfo
    binding: HttpBinding
    path_params: dict[str, str]


def match_rest(rpcs: list[RpcInfo], method: str, path: str) -> RestMatch | None:
    """The annotation (among `rpcs`) that a REST request hits, as grpc-gateway would route it."""
    for rpc in rpcs:
        for b in rpc.bindings:
            if b.method != method:
                continue
            params = b.template.match(path)
            if params is not None:
                return RestMatch(rpc, b, params)
    return None
