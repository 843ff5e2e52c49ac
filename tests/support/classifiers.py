"""Classifier inputs from the NIH sample images and randomised weights, shared by the classifier, checkpoint,
AMP, operating-point and GPU tests."""

from __future__ import annotations

from typing import Any

import torch

from cxr_classification.model import ChestXrayClassifier, ClassifierInput
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_serving.images import decode_image
from tests.support.paths import cxr14_images


def inputs(model: ChestXrayClassifier, n: int) -> list[ClassifierInput]:
    spec = PreprocessSpec.from_config(model.cfg)
    return [ClassifierInput(preprocess(decode_image(p.read_bytes()).pixels, spec)) for p in cxr14_images(n)]


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, so a mis-mapped BN key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module.eval()


def nih_batch(cfg: Any, n: int = 2) -> torch.Tensor:
    """The first `n` NIH images preprocessed for `cfg`, as one batch."""
    spec = PreprocessSpec.from_config(cfg)
    return torch.stack([preprocess(decode_image(p.read_bytes()).pixels, spec) for p in cxr14_images(n)])


def small_densenet() -> ChestXrayClassifier:
    """An untrained 64 px multi-label densenet121 on the CPU, loaded: the classifier tests' common model."""
    from cxr_classification.config import MultiLabelClassifierConfig
    from cxr_serving.device import InferenceDevice
    from cxr_serving.settings import PerformanceConfig

    cpu = InferenceDevice.resolve("cpu", PerformanceConfig())
    model = ChestXrayClassifier("multi", MultiLabelClassifierConfig(allow_untrained=True, input_size=64), cpu)
    model.load()
    return model
