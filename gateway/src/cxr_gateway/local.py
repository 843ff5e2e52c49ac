"""Values for kong.yml's DECK_* placeholders when running locally: taken from the cxr config."""

from __future__ import annotations

from pathlib import Path

from cxr_serving.settings import Settings

SERVICES = ("classification", "segmentation", "rag")


def local_defaults(settings: Settings) -> dict[str, str]:
    """Backends at the config's `services` endpoints, the config's first API key as the consumer key."""
    out = {
        "DECK_BACKEND_PROTOCOL": "grpcs" if settings.security.tls.enabled else "grpc",
        "DECK_OTEL_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
    }
    fallback = Settings().services  # the built-in ports (50051-50053) for services the config omits
    for name in SERVICES:
        ep = settings.services.get(name) or fallback[name]
        host = "127.0.0.1" if ep.host in ("0.0.0.0", "::", "") else ep.host
        out[f"DECK_{name.upper()}_HOST"] = host
        out[f"DECK_{name.upper()}_PORT"] = str(ep.port)
    keys = list(settings.security.api_keys)
    key_file = settings.security.api_key_file
    if not keys and key_file is not None and Path(key_file).exists():
        lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    if keys:
        out["DECK_CXR_API_KEY"] = keys[0]
    return out
