"""BatchNorm folding at load (cxr_serving.fold): same outputs, fewer layers, the original untouched,
and only the pairs it is safe to fold."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.fold import fold_batchnorm
from cxr_serving.settings import PerformanceConfig


def _randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine weights (a fresh BatchNorm is the identity)."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def _bns(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)  # conv2's output also feeds the residual sum: not foldable
        self.pre = nn.BatchNorm2d(8)  # BatchNorm before a conv (DenseNet's pre-activation): not foldable
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        z = self.bn2(z) + z
        return self.conv3(torch.relu(self.pre(z)))


def test_folds_conv_then_batchnorm_and_answers_the_same():
    block = _randomize_bn(Block())
    original = copy.deepcopy(block.state_dict())
    x = torch.randn(2, 3, 16, 16)
    folded, n = fold_batchnorm(block)
    assert n == 1 and _bns(folded) == 2  # only bn1
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)
    for k, v in block.state_dict().items():  # the original (Grad-CAM's network) is untouched
        assert torch.equal(v, original[k]), k
    assert _bns(block) == 3


def test_a_conv_called_twice_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    m = _randomize_bn(Shared())
    folded, n = fold_batchnorm(m)
    assert n == 0 and folded is m


def test_an_untraceable_module_is_served_as_it_is():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # fx cannot trace a branch on a tensor value
                return self.bn(self.conv(x))
            return x

    m = _randomize_bn(DataDependent())
    assert fold_batchnorm(m) == (m, 0)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Block().train())


@pytest.mark.parametrize("fold", [True, False])
def test_the_device_folds_when_configured_and_keeps_channels_last(fold):
    perf = PerformanceConfig(fold_batchnorm=fold, channels_last=True)
    device = InferenceDevice.resolve("cpu", perf)
    block = _randomize_bn(Block())
    reference = copy.deepcopy(block)
    runner = device.prepare(block)
    assert _bns(runner) == (2 if fold else 3)
    x = device.batch_to_device(torch.randn(2, 3, 16, 16))
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), reference(x), rtol=1e-5, atol=1e-5)
    if fold:
        assert runner.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_served_classifier_and_segmenter_are_folded_and_answer_as_unfolded():
    """The real networks: DenseNet-121 folds the conv->BN inside each dense layer (its other BNs come
    before a conv), the U-Net's ResNet encoder and decoder blocks fold theirs; answers are unchanged."""
    from cxr_classification.config import MultiLabelClassifierConfig
    from cxr_classification.model import ChestXrayClassifier, ClassifierInput
    from cxr_segmentation.config import SegmentationConfig
    from cxr_segmentation.model import SegmentationModel

    x = torch.rand(2, 3, 64, 64)
    answers = {}
    for fold in (True, False):
        device = InferenceDevice.resolve("cpu", PerformanceConfig(fold_batchnorm=fold))
        cls = ChestXrayClassifier("multi", MultiLabelClassifierConfig(allow_untrained=True, input_size=64), device)
        cls.load()
        seg = SegmentationModel(
            SegmentationConfig(allow_untrained=True, input_size=64, encoder="resnet18"), device, warmup_batches=0
        )
        seg.load()
        runner_bns = _bns(cls._runner)
        assert _bns(cls._network) == 121  # Grad-CAM's network keeps every layer
        assert runner_bns == (121 - 59 if fold else 121)  # the stem, and one per dense layer (6+12+24+16)
        assert (_bns(seg._net) < 20) == fold
        items = [ClassifierInput(x[0]), ClassifierInput(x[1])]
        answers[fold] = (np.stack([o.probabilities for o in cls.predict(items)]), torch.stack(seg.predict([*x])))
    np.testing.assert_allclose(answers[True][0], answers[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(answers[True][1], answers[False][1], rtol=1e-4, atol=1e-4)
