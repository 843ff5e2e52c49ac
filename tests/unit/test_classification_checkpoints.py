"""Checkpoint parity: build each reference model with random weights, save it in its own format,
load it through our loader and get the same outputs on real NIH images (fp32, tol 1e-5)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import torchxrayvision as xrv
from safetensors.torch import save_file

from cxr_classification.checkpoints import normalize_keys
from cxr_classification.config import NIH_LABELS, XRV_TARGETS, BinaryClassifierConfig, MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier, ClassifierInput
from cxr_serving.device import InferenceDevice
from cxr_serving.errors import CheckpointError
from cxr_serving.lifecycle import UNTRAINED, checkpoint_version
from cxr_serving.settings import PerformanceConfig
from tests.support.classifiers import nih_batch, randomize_

TOL = 1e-5
CPU = InferenceDevice.resolve("cpu", PerformanceConfig())


def served(cfg, path: Path | None, device: InferenceDevice = CPU) -> ChestXrayClassifier:
    model = ChestXrayClassifier("m", cfg, device, checkpoint_path=path, warmup_batches=0)
    model.load()
    return model


def probabilities(model: ChestXrayClassifier, x: torch.Tensor) -> np.ndarray:
    return np.stack([o.probabilities for o in model.predict([ClassifierInput(t) for t in x])])


def to_chexnet_names(key: str) -> str:
    """torchvision names -> the pre-0.4 names CheXNet's checkpoint uses (`norm1` -> `norm.1`)."""
    return re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", key)


class CheXNet(torch.nn.Module):
    """arnoweng/CheXNet's module: torchvision DenseNet-121 with Sequential(Linear, Sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.densenet121 = torchvision.models.densenet121(weights=None)
        self.densenet121.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.densenet121(x)


@pytest.mark.parametrize(("fmt", "size"), [("chexnet", 224), ("auto", 64)])
def test_chexnet_training_checkpoint_matches_torchvision(tmp_path, fmt, size):
    ref = randomize_(CheXNet(), seed=1)
    sd = {"module." + to_chexnet_names(k): v for k, v in ref.state_dict().items()}
    assert any(".norm.1." in k for k in sd) and "module.densenet121.classifier.0.weight" in sd
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "arch": "densenet121", "state_dict": sd, "best_loss": 0.15}, path)

    cfg = MultiLabelClassifierConfig(checkpoint_format=fmt, input_size=size)
    x = nih_batch(cfg)
    with torch.no_grad():
        expected = ref(x).numpy()
    model = served(cfg, path)
    np.testing.assert_allclose(probabilities(model, x), expected, atol=TOL, rtol=0)
    assert model.version == checkpoint_version(path) and not model.untrained


@pytest.mark.parametrize("saver", ["training_dict_dataparallel", "safetensors"])
def test_timm_swin_matches_timm(tmp_path, saver):
    ref = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=1), seed=2)
    if saver == "safetensors":
        path = tmp_path / "swin.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        path = tmp_path / "swin.pt"
        sd = {"module." + k: v for k, v in ref.state_dict().items()}
        torch.save({"epoch": 3, "model": sd, "optimizer": {"lr": 0.001}}, path)

    cfg = BinaryClassifierConfig()
    x = nih_batch(cfg)
    with torch.no_grad():
        expected = torch.sigmoid(ref(x)).numpy()
    np.testing.assert_allclose(probabilities(served(cfg, path), x), expected, atol=TOL, rtol=0)


def test_binary_softmax_head_reports_the_abnormal_class(tmp_path):
    ref = randomize_(torchvision.models.densenet121(weights=None, num_classes=2), seed=3)
    path = tmp_path / "binary.pt"
    torch.save(ref.state_dict(), path)
    cfg = BinaryClassifierConfig(model_type="densenet121", num_classes=2, input_size=64)
    x = nih_batch(cfg)
    with torch.no_grad():
        expected = torch.softmax(ref(x), dim=1)[:, 1:].numpy()
    np.testing.assert_allclose(probabilities(served(cfg, path), x), expected, atol=TOL, rtol=0)


def test_torchxrayvision_densenet_matches_xrv(tmp_path):
    ref = randomize_(xrv.models.DenseNet(weights=None), seed=4)
    assert list(ref.targets) == list(XRV_TARGETS)
    path = tmp_path / "xrv.pt"
    torch.save(ref.state_dict(), path)

    cfg = MultiLabelClassifierConfig(checkpoint_format="xrv")
    assert cfg.normalization == "xrv" and cfg.in_chans == 1
    x = nih_batch(cfg)
    assert x.shape[1] == 1 and float(x.min()) >= -1024 and float(x.max()) <= 1024
    with torch.no_grad():
        logits = ref(x)
    nih_index = [XRV_TARGETS.index(label) for label in NIH_LABELS]
    expected = torch.sigmoid(logits)[:, nih_index].numpy()
    np.testing.assert_allclose(probabilities(served(cfg, path), x), expected, atol=TOL, rtol=0)


def test_torchxrayvision_operating_points_are_applied(tmp_path):
    op = torch.rand(18, generator=torch.Generator().manual_seed(5)) * 0.3 + 0.01
    op[15] = float("nan")  # xrv marks outputs without an operating point with NaN
    ref = randomize_(xrv.models.DenseNet(weights=None, op_threshs=op), seed=6)
    path = tmp_path / "xrv-op.pt"
    torch.save(ref.state_dict(), path)
    assert "op_threshs" in torch.load(path, weights_only=True)

    cfg = MultiLabelClassifierConfig(checkpoint_format="xrv", input_size=64)
    x = nih_batch(cfg)
    with torch.no_grad():
        expected = ref(x)[:, [XRV_TARGETS.index(label) for label in NIH_LABELS]].numpy()
    # Same memory format as the reference: xrv's operating-point normalisation scales a probability
    # by up to 1/(2*op) (50x here), so channels_last's ~1e-6 reordering of conv sums could exceed 1e-5.
    contiguous = InferenceDevice.resolve("cpu", PerformanceConfig(channels_last=False))
    np.testing.assert_allclose(probabilities(served(cfg, path, contiguous), x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.0, float("inf"), float("-inf")])
def test_operating_points_outside_0_1_are_refused_naming_file_and_label(tmp_path, bad):
    """An operating point <= 0 would make its label positive on every image, >= 1 never: refused at load."""
    state = xrv.models.DenseNet(weights=None, op_threshs=torch.full((18,), 0.3)).state_dict()
    state["op_threshs"][XRV_TARGETS.index("Effusion")] = bad
    state["op_threshs"][XRV_TARGETS.index("Hernia")] = float("nan")  # no operating point: allowed
    path = tmp_path / "xrv-bad-op.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        served(MultiLabelClassifierConfig(checkpoint_format="xrv", input_size=64), path)
    assert str(path) in err.value.message and f"Effusion={bad!r}" in err.value.message
    assert "Hernia" not in err.value.message and "(0, 1)" in err.value.message


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    path = tmp_path / "wrong-head.pt"
    torch.save(torchvision.models.densenet121(weights=None, num_classes=18).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        served(MultiLabelClassifierConfig(input_size=64), path)
    assert err.value.reason == "CHECKPOINT_MISMATCH"
    assert "classifier.weight: checkpoint (18, 1024) vs model (14, 1024)" in err.value.message

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        served(MultiLabelClassifierConfig(input_size=64), path)
    assert "missing keys" in err.value.message and "features.conv0.weight" in err.value.message
    assert "unexpected keys" in err.value.message and "'fc.weight'" in err.value.message


def test_pickled_models_need_allow_pickle(tmp_path):
    ref = randomize_(torchvision.models.densenet121(weights=None, num_classes=14), seed=7)
    path = tmp_path / "whole-model.pt"
    torch.save(ref, path)  # a whole pickled module, like the original torchxrayvision release files
    with pytest.raises(CheckpointError, match="allow_pickle"):
        served(MultiLabelClassifierConfig(input_size=64), path)
    cfg = MultiLabelClassifierConfig(input_size=64, allow_pickle=True)
    x = nih_batch(cfg, 1)
    with torch.no_grad():
        expected = torch.sigmoid(ref(x)).numpy()
    np.testing.assert_allclose(probabilities(served(cfg, path), x), expected, atol=TOL, rtol=0)


def test_missing_or_unset_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as err:
        served(MultiLabelClassifierConfig(input_size=64), tmp_path / "nope.pt")
    assert err.value.reason == "CHECKPOINT_NOT_FOUND"
    with pytest.raises(CheckpointError) as err:
        served(MultiLabelClassifierConfig(input_size=64), None)
    assert err.value.reason == "CHECKPOINT_NOT_CONFIGURED" and "allow_untrained" in err.value.message
    model = served(MultiLabelClassifierConfig(input_size=64, allow_untrained=True), None)
    assert model.version == UNTRAINED and model.untrained


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "note": "no weights here"}, path)
    with pytest.raises(CheckpointError, match="without a state dict"):
        served(MultiLabelClassifierConfig(input_size=64), path)


def test_checkpoint_directory_names_its_one_weights_file(tmp_path):
    """The deployment guide configures `/mnt/models/fourteen_class_classifier`, a directory."""
    ref = randomize_(torchvision.models.densenet121(weights=None, num_classes=14), seed=8)
    folder = tmp_path / "fourteen_class_classifier"
    folder.mkdir()
    (folder / "README.txt").write_text("trained on NIH")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "weights.safetensors"))
    cfg = MultiLabelClassifierConfig(input_size=64)
    x = nih_batch(cfg, 1)
    model = served(cfg, folder)
    with torch.no_grad():
        np.testing.assert_allclose(probabilities(model, x), torch.sigmoid(ref(x)).numpy(), atol=TOL, rtol=0)
    assert model.version == checkpoint_version(folder / "weights.safetensors")
    (folder / "other.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"exactly one weights file.*other.pt.*weights.safetensors"):
        served(cfg, folder)


def test_key_normalisation_strips_wrapper_prefixes_only_when_needed():
    expected = {"features.conv0.weight", "classifier.weight"}
    t = torch.zeros(1)
    lightning = normalize_keys({"model.features.conv0.weight": t, "model.classifier.weight": t}, expected)
    assert set(lightning.state_dict) == expected
    compiled_ddp = normalize_keys(
        {"module._orig_mod.features.conv0.weight": t, "module._orig_mod.classifier.weight": t}, expected
    )
    assert set(compiled_ddp.state_dict) == expected
    timm_like = {"model.weight": t, "head.weight": t}  # a network whose own keys start with "model."
    assert set(normalize_keys(timm_like, {"model.weight", "head.weight"}).state_dict) == set(timm_like)
    with pytest.raises(CheckpointError, match="op_threshs"):
        normalize_keys({"op_threshs": t, "classifier.weight": t}, expected, "state_dict")
