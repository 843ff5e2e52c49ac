"""The model's preprocess/postprocess hooks on the request path: the defaults are identities, and a
model's own hooks are called per request on the decode pool by `binding.infer` (the toy service's path)."""

import threading

import grpc
import numpy as np
import pytest

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.images import DecodedImage, decode_image
from tests.support.servers import auth, make_settings, running_server
from tests.support.toy_service import BrightnessModel, build_toy


class HookedBrightness(BrightnessModel):
    """Hooks that transform: every input becomes a constant 0.2 image, every output is doubled."""

    def __init__(self) -> None:
        super().__init__()
        self.preprocessed: list[tuple[tuple[int, int], str]] = []
        self.postprocessed: list[tuple[float, str]] = []

    def preprocess(self, decoded: DecodedImage) -> np.ndarray:
        self.preprocessed.append(((decoded.height, decoded.width), threading.current_thread().name))
        return np.full((4, 4), 0.2, dtype=np.float32)

    def postprocess(self, output, options=None):
        self.postprocessed.append((output, threading.current_thread().name))
        return output * 2


async def classify(server, png: bytes) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(
            pb.ClassifyImageRequest(image=common_pb2.Image(data=png)), metadata=auth()
        )
    return resp.predictions[0].findings[0].probability


def test_the_default_hooks_are_identities(sample_png):
    decoded = decode_image(sample_png)
    model = BrightnessModel()
    assert model.preprocess(decoded) is decoded.pixels
    output = object()
    assert model.postprocess(output) is output and model.postprocess(output, {"any": "options"}) is output


async def test_default_hooks_serve_the_mean_of_the_decoded_pixels(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s, BrightnessModel())) as server:
        p = await classify(server, sample_png)
    assert p == pytest.approx(float(np.mean(decode_image(sample_png).pixels)), rel=1e-5)


async def test_a_models_own_hooks_are_called_on_the_decode_pool_by_the_service_path(sample_png):
    s = make_settings()
    model = HookedBrightness()
    decoded = decode_image(sample_png)
    async with running_server(s, build_toy(s, model)) as server:
        p = await classify(server, sample_png)
        p2 = await classify(server, sample_png)
    assert p == p2 == pytest.approx(0.4, rel=1e-6)  # mean of the preprocessed 0.2 image, doubled by postprocess
    assert [shape for shape, _ in model.preprocessed] == [(decoded.height, decoded.width)] * 2
    assert [out for out, _ in model.postprocessed] == [pytest.approx(0.2, rel=1e-6)] * 2
    threads = {t for _, t in model.preprocessed + model.postprocessed}
    assert threads and all(t.startswith("decode") for t in threads), threads
