"""BatchNorm folding at load (cxr_serving.optimize.fold): same outputs, fewer layers, the original untouched,
only the pairs it is safe to fold, and no effect on forwards running on other threads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cxr_serving.device import InferenceDevice
from cxr_serving.optimize.fold import fold_batchnorm
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
    """bn1 folds; bn2's conv output also feeds the residual sum (found by checking the answer) and
    `pre` follows a ReLU: neither folds."""
    block = _randomize_bn(Block())
    original = copy.deepcopy(block.state_dict())
    x = torch.randn(2, 3, 16, 16)
    folded, n = fold_batchnorm(block, torch.randn(1, 3, 16, 16))
    assert n == 1 and _bns(folded) == 2  # only bn1
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
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
    folded, n = fold_batchnorm(m, torch.randn(1, 3, 8, 8))
    assert n == 0 and folded is m


def test_data_dependent_control_flow_is_fine_and_a_failing_forward_skips_the_fold():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # a branch on a tensor value (torch.fx could not trace this)
                return self.bn(self.conv(x))
            return x

    m = _randomize_bn(DataDependent())
    folded, n = fold_batchnorm(m, torch.rand(1, 3, 8, 8))
    assert n == 1 and isinstance(folded.bn, nn.Identity)
    assert fold_batchnorm(m, torch.rand(1, 5, 8, 8)) == (m, 0)  # wrong channel count: served as it is


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Block().train(), torch.rand(1, 3, 8, 8))


def test_folding_leaves_forwards_on_other_threads_alone():
    """Two models load (and fold) while a third serves on other threads: every forward answers.
    (torch.fx's tracer patched nn.Module.__call__ process-wide and failed exactly this.)"""
    import threading

    from torchvision.models import resnet18

    serving = _randomize_bn(Block())
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        want = serving(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    torch.testing.assert_close(serving(x), want)
            except BaseException as exc:
                errors.append(exc)
                return

    def load() -> None:
        try:
            net = _randomize_bn(resnet18(num_classes=3))
            _, n = fold_batchnorm(net, torch.rand(1, 3, 64, 64))
            assert n == 20, n  # stem + 2 per basic block + 3 downsample convs
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    loaders = [threading.Thread(target=load) for _ in range(2)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    stop.set()
    server.join()
    assert errors == []


@pytest.mark.parametrize("fold", [True, False])
def test_the_device_folds_when_configured_and_keeps_channels_last(fold):
    perf = PerformanceConfig(fold_batchnorm=fold, channels_last=True, trace_models=False)  # inspects the folded modules
    device = InferenceDevice.resolve("cpu", perf)
    block = _randomize_bn(Block())
    reference = copy.deepcopy(block)
    runner = device.prepare(block, example=torch.randn(1, 3, 16, 16))
    assert _bns(runner) == (2 if fold else 3)
    assert device.prepare(reference) is reference  # no example: nothing to check a fold against
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
        device = InferenceDevice.resolve("cpu", PerformanceConfig(fold_batchnorm=fold, trace_models=False))
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
