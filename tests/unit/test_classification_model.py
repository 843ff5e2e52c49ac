"""ChestXrayClassifier: batched forward equals single forwards, Grad-CAM, unload."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_classification.config import BinaryClassifierConfig, MultiLabelClassifierConfig
from cxr_classification.model import ChestXrayClassifier, ClassifierInput
from cxr_serving.device import InferenceDevice
from cxr_serving.errors import ModelNotReadyError
from cxr_serving.settings import PerformanceConfig
from tests.support.classifiers import inputs, small_densenet

CPU = InferenceDevice.resolve("cpu", PerformanceConfig())


@pytest.fixture(scope="module")
def densenet():
    return small_densenet()


def test_batched_forward_equals_single_forwards(densenet):
    items = inputs(densenet, 4)
    batched = densenet.predict(items)
    for item, out in zip(items, batched, strict=True):
        single = densenet.predict([item])[0]
        np.testing.assert_allclose(out.probabilities, single.probabilities, atol=1e-5, rtol=0)
    assert batched[0].probabilities.shape == (14,)
    assert ((batched[0].probabilities > 0) & (batched[0].probabilities < 1)).all()
    assert not np.allclose(batched[0].probabilities, batched[1].probabilities)


def test_grad_cam_only_for_the_items_that_ask(densenet):
    plain, asking = inputs(densenet, 2)
    asking = ClassifierInput(asking.image, ("Cardiomegaly", "Effusion"))
    out = densenet.predict([plain, asking])
    assert out[0].heatmaps == {}
    assert set(out[1].heatmaps) == {"Cardiomegaly", "Effusion"}
    png = Image.open(io.BytesIO(out[1].heatmaps["Cardiomegaly"]))
    assert png.format == "PNG" and png.mode == "L" and png.size == (64, 64)
    # Grad-CAM must not change the probabilities of the batch.
    again = densenet.predict([plain, ClassifierInput(asking.image)])
    np.testing.assert_allclose(out[1].probabilities, again[1].probabilities, atol=1e-6, rtol=0)


def test_grad_cam_on_swin_channels_last_features():
    torch.manual_seed(0)  # random weights: a fixed draw, whatever ran before (some draws give an all-zero map)
    model = ChestXrayClassifier("bin", BinaryClassifierConfig(allow_untrained=True, input_size=64), CPU)
    model.load()
    (item,) = inputs(model, 1)
    out = model.predict([ClassifierInput(item.image, ("abnormal",))])[0]
    heat = np.asarray(Image.open(io.BytesIO(out.heatmaps["abnormal"])))
    assert heat.shape == (64, 64) and heat.max() == 255  # normalised to its peak


def test_warm_up_sizes():
    cfg = MultiLabelClassifierConfig(allow_untrained=True, input_size=64)
    assert ChestXrayClassifier("m", cfg, CPU, max_batch_size=8).warmup_batch_sizes() == [1]
    assert ChestXrayClassifier("m", cfg, CPU, warmup_batches=0).warmup_batch_sizes() == []
    gpu = InferenceDevice("cuda", use_amp=True, amp_dtype="bfloat16", channels_last=True, compile=False)
    assert ChestXrayClassifier("m", cfg, gpu, max_batch_size=4).warmup_batch_sizes() == [4, 3, 2, 1]


def test_unload_frees_and_refuses():
    model = ChestXrayClassifier("multi", MultiLabelClassifierConfig(allow_untrained=True, input_size=64), CPU)
    model.load()
    items = inputs(model, 1)
    assert model.loaded and model.version == "untrained"
    model.unload()
    assert not model.loaded and model.version == ""
    with pytest.raises(ModelNotReadyError):
        model.predict(items)
