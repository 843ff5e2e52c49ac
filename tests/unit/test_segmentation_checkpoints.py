"""Checkpoint layouts, mismatch messages, versions, untrained policy, and the config schema."""

import pytest
import torch

from cxr_segmentation.checkpoints import apply_state_dict, normalize_state_dict, read_state_dict
from cxr_segmentation.config import DEFAULT_CLASSES, SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.networks import build_network
from cxr_segmentation.service import segmentation_config
from cxr_serving.device import InferenceDevice
from cxr_serving.errors import CheckpointError, ConfigError
from cxr_serving.lifecycle import checkpoint_version
from cxr_serving.settings import PerformanceConfig
from tests.support.servers import make_settings

CPU = InferenceDevice.resolve(
    "cpu", PerformanceConfig(fold_batchnorm=False, trace_models=False)
)  # the served network is the loaded one, eager
CFG = SegmentationConfig(encoder="resnet18", input_size=64)


@pytest.fixture(scope="module")
def reference_state():
    torch.manual_seed(3)
    return build_network(CFG).state_dict()


def save(path, obj):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("plain.pt", lambda sd: sd),
        ("training.pt", lambda sd: {"epoch": 7, "optimizer": {"lr": 0.1}, "state_dict": sd}),
        ("model_key.pth", lambda sd: {"model": sd, "best_dice": 0.9}),
        ("ddp.pt", lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}),
        ("compiled.pt", lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),
        ("weights.safetensors", lambda sd: sd),
    ],
)
def test_checkpoint_layouts_load_identically(tmp_path, reference_state, name, wrap):
    path = save(tmp_path / name, wrap(reference_state))
    model = SegmentationModel(CFG, CPU, default_checkpoint=path, warmup_batches=0)
    model.load()
    assert model.version == checkpoint_version(path) and not model.untrained
    loaded = model._net.state_dict()
    for k, v in reference_state.items():
        assert torch.equal(loaded[k], v), k


def test_mismatch_names_keys_and_shapes(tmp_path, reference_state):
    five = reference_state
    three = build_network(SegmentationConfig(encoder="resnet18", input_size=64, classes=["a", "b", "c"])).state_dict()
    path = save(tmp_path / "three.pt", three)
    with pytest.raises(CheckpointError) as err:
        read_and_apply(path, five)
    msg = err.value.message
    assert "segmentation_head.0.weight: checkpoint (3, 16, 3, 3) vs model (5, 16, 3, 3)" in msg
    assert "shape mismatch" in msg and err.value.reason == "CHECKPOINT_MISMATCH"

    partial = {k: v for k, v in five.items() if not k.startswith("decoder.")}
    partial["extra.layer.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        read_and_apply(save(tmp_path / "partial.pt", partial), five)
    assert "missing keys (e.g. decoder." in err.value.message
    assert "1 unexpected keys (e.g. extra.layer.weight)" in err.value.message


def read_and_apply(path, expected_state):
    net = build_network(CFG)
    assert set(net.state_dict()) == set(expected_state)
    apply_state_dict(net, read_state_dict(path), source=str(path))


def test_unreadable_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        read_state_dict(tmp_path / "nope.pt")
    assert err.value.reason == "CHECKPOINT_NOT_FOUND"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="could not be read"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="no state_dict found"):
        normalize_state_dict({"epoch": 3, "lr": 0.1})


def test_untrained_needs_explicit_permission():
    model = SegmentationModel(CFG, CPU, warmup_batches=0)
    with pytest.raises(CheckpointError, match="checkpoint_path") as err:
        model.load()
    assert err.value.reason == "CHECKPOINT_NOT_CONFIGURED"
    allowed = SegmentationModel(CFG.model_copy(update={"allow_untrained": True}), CPU, warmup_batches=1)
    allowed.load()
    assert allowed.untrained and allowed.version == "untrained"
    allowed.unload()
    assert allowed.version == ""


def test_config_defaults_and_errors_name_the_field():
    cfg = segmentation_config(make_settings(models__segmentation={"allow_untrained": True}))
    assert (cfg.architecture, cfg.encoder, cfg.classes) == ("Unet", "resnet34", list(DEFAULT_CLASSES))
    assert cfg.input_size == 512 and cfg.threshold == 0.5
    for bad, field in [
        ({"input_size": 100}, "models.segmentation.input_size"),
        ({"threshold": 1.5}, "models.segmentation.threshold"),
        ({"architecture": "NotANet"}, "models.segmentation.architecture"),
        ({"classes": ["heart", "heart"]}, "models.segmentation.classes"),
        ({"checkpoint_format": "onnx"}, "models.segmentation.checkpoint_format"),
        ({"enocder": "resnet34"}, "models.segmentation.enocder"),
    ]:
        with pytest.raises(ConfigError) as err:
            segmentation_config(make_settings(models__segmentation=bad))
        assert field in str(err.value), (bad, str(err.value))


def test_unknown_encoder_is_a_clear_error():
    cfg = SegmentationConfig(encoder="resnet9000", allow_untrained=True, input_size=64)
    with pytest.raises(CheckpointError, match="resnet9000"):
        SegmentationModel(cfg, CPU, warmup_batches=0).load()


@pytest.mark.parametrize("name", ["local.json", "production.json"])
def test_shipped_configs_validate(name):
    from cxr_serving.settings import load_settings
    from tests.support.paths import REPO

    cfg = segmentation_config(load_settings(REPO / "config" / name, environ={}))
    assert cfg.enabled and cfg.classes == list(DEFAULT_CLASSES)
    assert cfg.allow_untrained == (name == "local.json")


def test_segmentation_batching_overrides_server_config():
    from cxr_segmentation.service import build_binding

    base = {"allow_untrained": True, "encoder": "resnet18", "input_size": 64}
    s = make_settings(models__segmentation=base, server_config__max_batch_size=8, server_config__max_batch_delay_ms=5)
    b = build_binding(s)
    assert (b.extra["batching"].max_batch_size, b.extra["batching"].max_batch_delay_ms) == (8, 5)
    s = make_settings(
        models__segmentation={**base, "max_batch_size": 1, "max_batch_delay_ms": 0}, server_config__max_batch_size=8
    )
    b = build_binding(s)
    assert (b.extra["batching"].max_batch_size, b.extra["batching"].max_batch_delay_ms) == (1, 0)
