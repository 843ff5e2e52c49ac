"""A small, valid extra catalog entry the catalog tests vary one field at a time."""

from __future__ import annotations

from typing import Any

ECHO_ENTRY: dict[str, Any] = {
    "name": "echo",
    "package": "json",
    "binding": "json:loads",
    "grpc_services": ["cxr.echo.v1.EchoService"],
    "port": 50060,
    "metrics_port": 9160,
    "model_admin": False,
    "idempotent": True,
}
