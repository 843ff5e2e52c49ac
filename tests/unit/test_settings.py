import json

import pytest
from pydantic import BaseModel, ConfigDict

from cxr_serving.errors import ConfigError
from cxr_serving.settings import env_overrides, load_settings


def write(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


def test_example_configs_load(repo_root):
    local = load_settings(repo_root / "config/local.json", environ={})
    prod = load_settings(repo_root / "config/production.json", environ={})
    assert local.server_config.device == "cpu"
    assert prod.server_config.device == "cuda"
    assert prod.performance.use_amp is True
    assert prod.security.max_image_size_mb == 50
    assert set(prod.models) == {"binary_classifier", "multiclass_classifier", "segmentation", "rag", "dicom"}


def test_defaults_without_file():
    s = load_settings(None, environ={})
    assert s.server_config.max_batch_size == 8
    assert s.security.allowed_image_formats == ["jpg", "jpeg", "png", "dcm"]
    assert s.endpoint("classification").port == 50051
    # cuDNN autotuning of every warmed batch size costs GPU start-up per model (docs/performance-history.md)
    assert s.performance.cudnn_benchmark is False
    assert load_settings(None, environ={"CXR_PERFORMANCE__CUDNN_BENCHMARK": "true"}).performance.cudnn_benchmark


def test_env_overrides_nested_and_flat(tmp_path):
    p = write(tmp_path, {"server_config": {"max_batch_size": 4}})
    env = {
        "CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "16",
        "CXR_LOG_LEVEL": "debug",
        "CXR_API_KEY": "k1,k2",
        "CXR_SECURITY__ALLOWED_IMAGE_FORMATS": '["PNG"]',
        "CXR_MODELS_PATH": "/mnt/models",
        "VECTOR_DB_HOST": "chroma",
        "VECTOR_DB_PORT": "8000",
    }
    s = load_settings(p, environ=env)
    assert s.server_config.max_batch_size == 16  # env beats file
    assert s.server_config.log_level == "DEBUG"
    assert s.security.api_keys == ["k1", "k2"]
    assert s.security.allowed_image_formats == ["png"]
    assert str(s.resolve_model_path("a.pth")) == "/mnt/models/a.pth"
    assert s.models["rag"] == {"vector_db_host": "chroma", "vector_db_port": 8000}


def test_config_path_from_env(tmp_path):
    p = write(tmp_path, {"server_config": {"max_batch_size": 3}})
    assert load_settings(None, environ={"CXR_CONFIG_PATH": str(p)}).server_config.max_batch_size == 3


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"server_config": {"max_batch_size": 0}}, "server_config.max_batch_size"),
        ({"server_config": {"device": "tpu"}}, "server_config.device"),
        ({"security": {"allowed_image_formats": ["gif"]}}, "security.allowed_image_formats.0"),
        ({"server_config": {"max_batch_sise": 8}}, "server_config.max_batch_sise"),
        ({"monitoring": {"enable_metrics": "maybe"}}, "monitoring.enable_metrics"),
    ],
)
def test_bad_config_names_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(write(tmp_path, data), environ={})


def test_bad_env_value_names_the_field():
    with pytest.raises(ConfigError, match=r"server_config\.max_batch_size"):
        load_settings(None, environ={"CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "lots"})


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.json", environ={})
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings(bad, environ={})


def test_model_section_validated_by_service_schema(tmp_path):
    class Cls(BaseModel):
        model_config = ConfigDict(extra="forbid")
        enabled: bool = True
        threshold: float = 0.5

    s = load_settings(write(tmp_path, {"models": {"m": {"threshold": "high"}}}), environ={})
    with pytest.raises(ConfigError, match=r"models\.m\.threshold"):
        s.model_section("m", Cls)
    assert s.model_section("absent", Cls) is None


def test_env_overrides_ignore_unrelated_variables():
    assert env_overrides({"PATH": "/bin", "CXR_CONFIG_PATH": "/x", "HOME": "/root"}) == {}
