"""The client's catalog reader refuses a CXR_SERVICE_CATALOG file it cannot use with a CatalogError (a
ValueError) naming the variable, the file and the field; `cxr` turns it into a usage error (exit 2)
and `cxr-mcp` into an argument error, with no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_client import ClientConfig
from cxr_client.catalog import CatalogError
from cxr_client.cli import main
from cxr_client.mcp.server import main as mcp_main
from tests.support.catalogs import ECHO_ENTRY as ENTRY


def _file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "extra.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BAD = [
    ({"services": [{**ENTRY, "port": "50060"}]}, r"services\[0\]\.port: must be a int, got '50060'"),
    ({"services": [{**ENTRY, "port": True}]}, r"services\[0\]\.port: must be a int"),
    ({"services": [{**ENTRY, "port": 0}]}, r"services\[0\]\.port: 0 is not a port"),
    ({"services": [{**ENTRY, "model_admin": 1}]}, r"services\[0\]\.model_admin: must be a bool"),
    ({"services": [{**ENTRY, "idempotent": "no"}]}, r"services\[0\]\.idempotent: must be a bool"),
    ({"services": [{**ENTRY, "grpc_services": "cxr.echo.v1.EchoService"}]}, r"grpc_services: must be a list"),
    ({"services": [{**ENTRY, "grpc_services": [1]}]}, r"grpc_services: must list full service names"),
    ({"services": [ENTRY, {k: v for k, v in ENTRY.items() if k != "idempotent"}]}, r"services\[1\]: missing key"),
    ({"services": ["echo"]}, r"services\[0\]: must be an object"),
    ({"services": {"echo": ENTRY}}, r"'services' is a list"),
    ("{services: []}", r"not valid JSON"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_catalog_files_name_the_variable_file_and_field(tmp_path: Path, data: object, message: str) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(CatalogError, match=message) as err:
        ClientConfig.from_env({"CXR_SERVICE_CATALOG": str(path)})
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value) and "CXR_SERVICE_CATALOG" in str(err.value)


def test_missing_file_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(CatalogError, match="cannot read") as err:
        ClientConfig.from_env({"CXR_SERVICE_CATALOG": str(missing)})
    assert str(missing) in str(err.value) and "CXR_SERVICE_CATALOG" in str(err.value)


@pytest.mark.parametrize("bad", ["missing", "field"])
def test_cli_and_mcp_report_a_bad_catalog_as_a_usage_error(tmp_path: Path, bad: str, monkeypatch, capsys) -> None:
    path = tmp_path / "nope.json" if bad == "missing" else _file(tmp_path, {"services": [{**ENTRY, "port": "x"}]})
    monkeypatch.setenv("CXR_SERVICE_CATALOG", str(path))
    assert main(["health"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr: service catalog ") and "CXR_SERVICE_CATALOG" in err and str(path) in err
    assert "Traceback" not in err and ("cannot read" if bad == "missing" else "port: must be a int") in err
    with pytest.raises(SystemExit) as exit_:
        mcp_main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "CXR_SERVICE_CATALOG" in err and str(path) in err and "Traceback" not in err
