"""Audit trail: one JSON line per request on the `cxr.audit` logger, for HIPAA-style access
records (45 CFR 164.312(b)): who (the gateway's consumer, a fingerprint of the API key, never
the key, and the role that key holds: admin, inference or none), what (method, models and
versions that answered), when (the line's `ts`), outcome (gRPC code), correlation id (added by
the JSON formatter) and peer.

No request content, image bytes or DICOM tags are ever put in the line. Health probes are not
audited (they touch no data). Route or ship the `cxr.audit` logger like any other logger.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

AUDIT = logging.getLogger("cxr.audit")

CONSUMER_HEADERS = ("x-consumer-username", "x-consumer-id")  # set by Kong's key-auth for the upstream
KEY_HEADERS = ("x-api-key", "apikey")
MODEL_INFO = "cxr.common.v1.ModelInfo"
UNAUDITED_PREFIX = "/grpc.health.v1.Health/"


def key_fingerprint(key: str) -> str:
    """A stable, non-reversible id of an API key (12 hex of its SHA-256)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def caller(metadata: Mapping[str, str], role: str = "none") -> dict[str, str]:
    consumer = next((metadata[h][:128] for h in CONSUMER_HEADERS if metadata.get(h)), "")
    key = next((metadata[h] for h in KEY_HEADERS if metadata.get(h)), "")
    return {"consumer": consumer, "key_id": key_fingerprint(key), "role": str(role)}


def models_in(message: Any) -> list[str]:
    """`name@version` of every ModelInfo in a response (two levels deep), sorted, unique.
    Never raises: auditing must not fail a request."""
    try:
        descriptor = getattr(message, "DESCRIPTOR", None)
        if descriptor is None:
            return []
        found: set[str] = set()
        _collect(message, _plan(descriptor, 0), found)
        return sorted(found)
    except Exception:  # pragma: no cover - defensive
        logging.getLogger(__name__).debug("could not read models from %s", type(message).__name__, exc_info=True)
        return []


# Per message type and depth: the fields that are, or lead to, a ModelInfo, as (name, repeated, plan below or
# None for a ModelInfo field). Worked out once per type, so a response is read along those paths only rather
# than by reflection over every field it has set.
_Plan = tuple[tuple[str, bool, "_Plan | None"], ...]
_PLANS: dict[tuple[Any, int], _Plan] = {}  # by descriptor object: two types of one name stay apart
MAX_ITEMS_READ = 64  # of a repeated field on the way to a ModelInfo


def _plan(descriptor: Any, depth: int) -> _Plan:
    key = (descriptor, depth)
    plan = _PLANS.get(key)
    if plan is None:
        steps: list[tuple[str, bool, _Plan | None]] = []
        for field in descriptor.fields:
            kind = field.message_type
            if kind is None or kind.GetOptions().map_entry:
                continue
            repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before
            if repeated is None:
                repeated = field.label == field.LABEL_REPEATED
            if kind.full_name == MODEL_INFO:
                steps.append((field.name, bool(repeated), None))
            elif depth < 2 and (below := _plan(kind, depth + 1)):
                steps.append((field.name, bool(repeated), below))
        plan = _PLANS[key] = tuple(steps)
    return plan


def _collect(message: Any, plan: _Plan, found: set[str]) -> None:
    for name, repeated, below in plan:
        if repeated:
            values = getattr(message, name)
        elif message.HasField(name):
            values = (getattr(message, name),)
        else:
            continue
        if below is None:
            found.update(f"{v.name}@{v.version or 'unversioned'}" for v in values)
        else:
            for v in values[:MAX_ITEMS_READ]:
                _collect(v, below, found)


def audit(method: str, code: str, who: Mapping[str, str], models: Sequence[str], peer: str, ms: float) -> None:
    if method.startswith(UNAUDITED_PREFIX) or not AUDIT.isEnabledFor(logging.INFO):
        return
    fields = {"audit": True, "method": method, "code": code, **who, "models": list(models), "peer": peer}
    AUDIT.info("audit", extra={"fields": {**fields, "ms": round(ms, 2)}})
