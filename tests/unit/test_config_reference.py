"""docs/configuration.md is generated from the settings models: it lists every key, its environment
variables really set that key, and `--check` (run by `make lint`) fails when the file is stale."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from cxr_serving import settings as settings_module
from cxr_serving.settings import Settings, env_overrides
from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_config_reference.py"
DOC = REPO / "docs" / "configuration.md"


gen = load_script("gen_config_reference")


def _sub_model(annotation: typing.Any) -> tuple[type[BaseModel] | None, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def settings_tree(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, typing.Any]]:
    """(dotted key, FieldInfo) of every field below Settings, through nested models and dicts of models."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        sub, keyed = _sub_model(field.annotation)
        if sub is not None:
            yield from settings_tree(sub, f"{path}.<name>." if keyed else f"{path}.")


def test_the_tree_walk_reaches_nested_and_keyed_sections() -> None:
    keys = {k for k, _ in settings_tree()}
    assert {"security.tls.client_ca_file", "services.<name>.port", "server_config.max_batch_size"} <= keys


def test_every_settings_key_has_a_row_in_the_committed_reference() -> None:
    doc = DOC.read_text()
    missing = [k for k, _ in settings_tree() if f"| `{k}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_model_schema_key_has_a_row() -> None:
    """Each field of each pydantic model in a service's config module appears under that model's heading."""
    doc = DOC.read_text()
    schemas = gen.model_schemas()
    assert {m.__name__ for _, m in schemas} >= {"SegmentationConfig", "RagConfig", "LlmConfig"}
    for _, model in schemas:
        heading = f"### `{model.__name__}` ("
        assert heading in doc, heading
        section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
        base, names = gen._schema_fields(model)
        inherited = set(model.model_fields) - set(names)
        assert base is not None or not inherited
        for name in names:
            assert f"| `{name}` |" in section, f"{model.__name__}.{name}"


def test_a_catalog_services_config_module_is_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The schema modules come from the catalog (`<package>.config`), so a 4th service's models are documented
    without editing the generator, and the committed reference is stale until it is regenerated."""
    from cxr_serving.catalog import load_catalog

    pkg = tmp_path / "cxr_echotest"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "from pydantic import BaseModel, Field\n\n\n"
        "class EchoModelConfig(BaseModel):\n"
        '    """An echo model."""\n\n'
        '    repeat: int = Field(2, description="how many times the echo repeats")\n'
    )
    entry = {
        "name": "echotest",
        "package": "cxr_echotest",
        "binding": "cxr_echotest:build",
        "grpc_services": ["cxr.echotest.v1.EchoService"],
        "port": 50070,
        "metrics_port": 9170,
        "model_admin": False,
        "idempotent": True,
    }
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"services": [entry]}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gen, "load_catalog", lambda: load_catalog([catalog]))
    assert gen.model_schema_modules()[-1] == "cxr_echotest.config"
    assert gen.model_schema_modules()[:3] == ("cxr_classification.config", "cxr_segmentation.config", "cxr_rag.config")
    doc = tmp_path / "configuration.md"
    doc.write_text(DOC.read_text())
    assert gen.main(["--check", "--path", str(doc)]) == 1
    assert gen.main(["--path", str(doc)]) == 0
    text = doc.read_text()
    assert "### `EchoModelConfig` (cxr_echotest.config)" in text
    assert "| `repeat` | int | `2` | how many times the echo repeats |" in text
    # a catalog service whose package is not installed stops the generator instead of leaving a gap
    monkeypatch.setattr(gen, "load_catalog", lambda: _missing(tmp_path, entry))
    with pytest.raises(SystemExit, match="cxr_nowhere is not installed"):
        gen.model_schema_modules()


def _missing(tmp_path: Path, entry: dict[str, typing.Any]) -> typing.Any:
    from cxr_serving.catalog import load_catalog

    path = tmp_path / "missing.json"
    path.write_text(json.dumps({"services": [{**entry, "package": "cxr_nowhere"}]}))
    return load_catalog([path])


def test_settings_keys_carry_a_description() -> None:
    undocumented = [k for k, f in settings_tree() if not f.description]
    assert not undocumented, f"Field(description=...) missing for {undocumented}"


def test_rag_schema_keys_carry_a_description() -> None:
    # the classification and segmentation schemas are being reshaped by issue 21 item 2; rag's is stable
    from cxr_rag.config import LlmConfig, RagConfig

    undocumented = [
        f"{m.__name__}.{n}" for m in (RagConfig, LlmConfig) for n, f in m.model_fields.items() if not f.description
    ]
    assert not undocumented, f"Field(description=...) missing for {undocumented}"


def _concrete(var: str) -> str:
    return var.replace("<NAME>", "CLASSIFICATION").replace("<KEY>", "PORT")


def _path_set(tree: dict[str, typing.Any]) -> str:
    parts = []
    node: typing.Any = tree
    while isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        parts.append(key)
        node = node[key]
    return ".".join(parts)


def test_each_documented_environment_variable_sets_its_key() -> None:
    rows = gen.settings_rows()
    checked = 0
    for row in rows:
        for var in (v.strip("` ") for v in row.env.split(",") if v.strip()):
            key = ".".join(row.path).replace("<name>", "classification")
            if var.endswith("__<KEY>"):
                key += ".classification.port"  # the row of the dict itself
            assert _path_set(env_overrides({_concrete(var): "1"})) == key, var
            checked += 1
    assert checked >= len([k for k, _ in settings_tree() if "." in k])  # every key below a section has one


def test_rag_short_variables_are_listed_with_their_keys() -> None:
    doc = DOC.read_text()
    llm = doc.split("### `LlmConfig` (", 1)[1].split("\n### ", 1)[0]
    assert "| `base_url` |" in llm and "`CXR_LLM_BASE_URL` |" in llm
    rag = doc.split("### `RagConfig` (", 1)[1].split("\n### ", 1)[0]
    assert "`VECTOR_DB_HOST` |" in rag and "`VECTOR_DB_PORT` |" in rag


def test_check_passes_on_the_committed_file() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_check_fails_on_a_stale_file_and_regeneration_fixes_it(tmp_path: Path) -> None:
    doc = tmp_path / "configuration.md"
    doc.write_text(DOC.read_text().replace("| `server_config.max_batch_size` |", "| `server_config.max_batch_sise` |"))
    assert gen.main(["--check", "--path", str(doc)]) == 1
    assert gen.main(["--path", str(doc)]) == 0
    assert gen.main(["--check", "--path", str(doc)]) == 0
    assert doc.read_text() == DOC.read_text()


def test_check_fails_when_a_settings_field_is_added(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Extended(Settings):
        new_knob: int = Field(3, description="a key added after the reference was generated")

    doc = tmp_path / "configuration.md"
    doc.write_text(DOC.read_text())
    monkeypatch.setattr(settings_module, "Settings", Extended)
    assert gen.main(["--check", "--path", str(doc)]) == 1
    assert gen.main(["--path", str(doc)]) == 0
    assert "| `new_knob` | int | `3` | a key added after the reference was generated |" in doc.read_text()
