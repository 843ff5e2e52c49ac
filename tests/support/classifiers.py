"""Classifier inputs from the NIH sample images, shared by the classifier, AMP and GPU tests."""

from __future__ import annotations

from cxr_classification.model import ChestXrayClassifier, ClassifierInput
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_serving.images import decode_image
from tests.support.paths import cxr14_images


def inputs(model: ChestXrayClassifier, n: int) -> list[ClassifierInput]:
    spec = PreprocessSpec.from_config(model.cfg)
    return [ClassifierInput(preprocess(decode_image(p.read_bytes()).pixels, spec)) for p in cxr14_images(n)]
