"""Values for kong.yml's DECK_* placeholders when running locally: taken from the cxr config."""

from __future__ import annotations

import secrets
from pathlib import Path

from cxr_serving.settings import Settings


def _keys(inline: list[str], key_file: Path | None) -> list[str]:
    keys = [k for k in inline if k]
    if not keys and key_file is not None and Path(key_file).exists():
        lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return keys


def local_defaults(settings: Settings) -> dict[str, str]:
    """Backends at the `services` endpoints of every catalog service, the config's first API key as the consumer key,
    its first admin key as the admin consumer's key. Without an admin key the admin consumer gets a
    random key nobody knows: admin routes stay closed instead of open."""
    out = {
        "DECK_BACKEND_PROTOCOL": "grpcs" if settings.security.tls.enabled else "grpc",
        "DECK_OTEL_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
    }
    for name in settings.catalog():  # every catalog service has an endpoint (its catalog ports by default)
        ep = settings.endpoint(name)
        host = "127.0.0.1" if ep.host in ("0.0.0.0", "::", "") else ep.host
        out[f"DECK_{name.upper()}_HOST"] = host
        out[f"DECK_{name.upper()}_PORT"] = str(ep.port)
    # the DICOM node's STOW-RS port: models.dicom.stow_port, else its default
    out["DECK_DICOM_STOW_PORT"] = str((settings.models.get("dicom") or {}).get("stow_port", DICOM_STOW_PORT))
    keys = _keys(list(settings.security.api_keys), settings.security.api_key_file)
    if keys:
        out["DECK_CXR_API_KEY"] = keys[0]
    # security.admin_api_keys / admin_api_key_file (CXR_ADMIN_API_KEY) belong to the services' settings
    sec = settings.security
    admin = _keys(list(getattr(sec, "admin_api_keys", None) or []), getattr(sec, "admin_api_key_file", None))
    out["DECK_CXR_ADMIN_API_KEY"] = admin[0] if admin else LOCKED_PREFIX + secrets.token_urlsafe(32)
    return out


LOCKED_PREFIX = "locked-"  # marks the generated admin key: no admin key is configured
DICOM_STOW_PORT = 8043  # models.dicom.stow_port's default (cxr_dicom.config, which the gateway does not import)
