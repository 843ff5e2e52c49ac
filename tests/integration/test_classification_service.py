"""The classification service end to end: a real grpc.aio server on 127.0.0.1:0, real NIH PNGs and DICOMs.

Models run untrained at 64 px here to keep CPU time small; parity at 224 px is in the unit tests.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
import torchvision
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from cxr_classification.config import NIH_LABELS
from cxr_classification.service import SERVICE_NAME, build_binding
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from cxr_serving.lifecycle import checkpoint_version
from cxr_serving.optimize.amp import cpu_has_native_bf16
from tests.support.paths import DICOM_DIR, REPO, cxr14_images
from tests.support.servers import auth, make_settings, running_server

BINARY, MULTI = "binary_classifier", "multiclass_classifier"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def models_config(**multi_overrides):
    return {
        BINARY: {"model_type": "swin_transformer", "allow_untrained": True, "input_size": 64},
        MULTI: {"model_type": "densenet121", "allow_untrained": True, "input_size": 64, **multi_overrides},
    }


def settings(models=None, **overrides):
    overrides.setdefault("server_config__max_batch_delay_ms", 30)
    overrides.setdefault("performance__warmup_batches", 0)
    return make_settings(models=models or models_config(), **overrides)


def png(i: int = 0) -> common_pb2.Image:
    return common_pb2.Image(data=cxr14_images(i + 1)[i].read_bytes(), content_type="image/png")


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def probs(prediction: pb.ModelPrediction) -> np.ndarray:
    return np.array([f.probability for f in prediction.findings])


def by_model(resp) -> dict[str, pb.ModelPrediction]:
    return {p.model.name: p for p in resp.predictions}


def reason(err: grpc.aio.AioRpcError) -> str:
    return error_info(rpc_status.from_call(err)).reason


async def health(ch, service=SERVICE_NAME):
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))).status


def channel(server):
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", -1)])


async def test_classify_png_with_both_models_says_untrained():
    s = settings(models=models_config(thresholds={"Cardiomegaly": 2**-20, "Hernia": 1.0}))
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        assert await health(ch) == SERVING
        resp = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png()), metadata=auth())
        preds = by_model(resp)
        assert set(preds) == {BINARY, MULTI} and resp.untrained
        for p in preds.values():
            assert p.model.untrained and p.model.version == "untrained" and p.model.device == "cpu"
            assert p.model.precision == "float32"  # use_amp is off unless configured
            assert p.model.state == common_pb2.MODEL_STATE_READY and p.inference_ms > 0
        (abnormal,) = preds[BINARY].findings
        assert abnormal.label == "abnormal" and 0 < abnormal.probability < 1 and abnormal.threshold == 0.5
        assert abnormal.positive == (abnormal.probability >= 0.5)
        assert preds[BINARY].model.architecture == "swin_tiny_patch4_window7_224"
        assert [f.label for f in preds[MULTI].findings] == list(NIH_LABELS)
        findings = {f.label: f for f in preds[MULTI].findings}
        assert findings["Cardiomegaly"].threshold == 2**-20 and findings["Cardiomegaly"].positive
        assert findings["Hernia"].threshold == 1.0 and not findings["Hernia"].positive
        assert findings["Mass"].threshold == 0.5
        assert preds[MULTI].model.architecture == "densenet121"
        assert resp.image.width == 512 and resp.image.format == "png" and resp.image.bits_stored == 8
        t = resp.timing
        assert t.decode_ms > 0 and t.preprocess_ms > 0 and t.inference_ms > 0
        assert t.total_ms >= t.decode_ms + t.preprocess_ms + t.inference_ms - 0.01
        # one model only, and the same answer as before
        only = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png(), model_names=[MULTI]), metadata=auth())
        assert [p.model.name for p in only.predictions] == [MULTI]
        np.testing.assert_allclose(probs(only.predictions[0]), probs(preds[MULTI]), atol=1e-6)


async def test_concurrent_calls_are_batched_and_equal_single_calls():
    s = settings(server_config__max_batch_delay_ms=200)
    binding = build_binding(s)
    async with running_server(s, binding) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        images = [png(i) for i in range(4)]
        singles = []
        for img in images:  # one at a time: batches of 1
            r = await stub.ClassifyImage(pb.ClassifyImageRequest(image=img, model_names=[MULTI]), metadata=auth())
            singles.append(probs(r.predictions[0]))
        before = _batch_counts(server)
        concurrent = await asyncio.gather(
            *(
                stub.ClassifyImage(pb.ClassifyImageRequest(image=i, model_names=[MULTI]), metadata=auth())
                for i in images
            )
        )
        batched = await stub.ClassifyImages(
            pb.ClassifyImagesRequest(images=images, model_names=[MULTI]), metadata=auth()
        )
        assert [r.index for r in batched.results] == [0, 1, 2, 3]
        for i in range(4):
            np.testing.assert_allclose(probs(concurrent[i].predictions[0]), singles[i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(probs(batched.results[i].predictions[0]), singles[i], atol=1e-5, rtol=0)
        assert not np.allclose(singles[0], singles[1])
        ones, batches = (after - prev for after, prev in zip(_batch_counts(server), before, strict=True))
        assert batches < 8 and ones < 8, (ones, batches)  # 8 images in fewer than 8 forward passes


def _batch_counts(server) -> tuple[float, float]:
    """(batches of size 1, all batches) of the multi-label model so far (the registry is per process)."""
    body = _metrics(server)
    ones = re.search(r'cxr_batch_size_bucket\{le="1.0",model="multiclass_classifier"\} ([\d.]+)', body)
    count = re.search(r'cxr_batch_size_count\{model="multiclass_classifier"\} ([\d.]+)', body)
    assert ones and count
    return float(ones.group(1)), float(count.group(1))


def _metrics(server) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()


async def test_dicom_monochrome1_equals_monochrome2_and_12_bit_variants():
    s = settings()
    names = [
        "nih-dx-mono2-8bit.dcm",
        "nih-dx-mono1-8bit.dcm",
        "nih-dx-mono2-12bit-window.dcm",
        "nih-dx-mono2-12bit-rle.dcm",
    ]
    images = [common_pb2.Image(data=(DICOM_DIR / n).read_bytes(), content_type="application/dicom") for n in names]
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        resp = await stub.ClassifyImages(pb.ClassifyImagesRequest(images=images), metadata=auth())
        assert all(not r.HasField("error") for r in resp.results), [r.error for r in resp.results]
        out = {names[r.index]: by_model(r) for r in resp.results}
        meta = {names[r.index]: r.image for r in resp.results}
        assert meta["nih-dx-mono1-8bit.dcm"].photometric_interpretation == "MONOCHROME1"
        assert meta["nih-dx-mono2-12bit-rle.dcm"].bits_stored == 12 and meta["nih-dx-mono2-8bit.dcm"].format == "dcm"
        assert meta["nih-dx-mono2-8bit.dcm"].pixel_spacing_row_mm > 0
        for model in (BINARY, MULTI):
            mono2 = probs(out["nih-dx-mono2-8bit.dcm"][model])
            np.testing.assert_allclose(probs(out["nih-dx-mono1-8bit.dcm"][model]), mono2, atol=1e-5, rtol=0)
            window = probs(out["nih-dx-mono2-12bit-window.dcm"][model])
            np.testing.assert_allclose(probs(out["nih-dx-mono2-12bit-rle.dcm"][model]), window, atol=1e-6, rtol=0)
            np.testing.assert_allclose(window, mono2, atol=2e-3, rtol=0)  # 12-bit rescale of the same 8-bit picture


async def test_classify_images_isolates_bad_images_and_streams():
    s = settings()
    corrupt = cxr14_images(1)[0].read_bytes()[:2000]
    images = [png(0), common_pb2.Image(data=corrupt), png(1)]
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        resp = await stub.ClassifyImages(pb.ClassifyImagesRequest(images=images), metadata=auth())
        assert resp.untrained and [r.index for r in resp.results] == [0, 1, 2]
        bad = resp.results[1]
        assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not bad.predictions
        assert error_info(bad.error).reason == "IMAGE_CORRUPT"
        assert len(resp.results[0].predictions) == 2 and resp.results[2].timing.total_ms > 0

        streamed = [
            r
            async for r in stub.StreamClassifyImages(
                pb.StreamClassifyImagesRequest(images=images, model_names=[MULTI]), metadata=auth()
            )
        ]
        assert sorted(r.result.index for r in streamed) == [0, 1, 2]
        good = {r.result.index: r for r in streamed if not r.result.HasField("error")}
        assert set(good) == {0, 2} and all(r.untrained for r in good.values())
        np.testing.assert_allclose(
            probs(good[2].result.predictions[0]), probs(by_model(resp.results[2])[MULTI]), atol=1e-5, rtol=0
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ClassifyImages(pb.ClassifyImagesRequest(), metadata=auth())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err.value) == "NO_IMAGES"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ClassifyImages(
                pb.ClassifyImagesRequest(images=[common_pb2.Image(data=b"x")] * 129), metadata=auth()
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err.value) == "TOO_MANY_IMAGES"
        with pytest.raises(grpc.aio.AioRpcError) as err:  # 2 images x 9 Grad-CAMs is over the cap of 16
            req = pb.ClassifyImagesRequest(images=images[:1] * 2, heatmap_labels=list(NIH_LABELS[:9]))
            await stub.ClassifyImages(req, metadata=auth())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err.value) == "TOO_MANY_HEATMAPS"


BAD_INPUTS = [
    ("text", b"hello, this is not an image" * 10, "", "IMAGE_FORMAT_UNKNOWN"),
    ("declared jpeg", None, "image/jpeg", "CONTENT_TYPE_MISMATCH"),
    ("truncated png", "truncated", "image/png", "IMAGE_CORRUPT"),
    ("tiny", png_bytes(np.full((32, 32), 128, np.uint8)), "", "IMAGE_TOO_SMALL"),
    ("strip", png_bytes(np.full((100, 600), 128, np.uint8)), "", "IMAGE_ASPECT_RATIO"),
    ("oversized", png_bytes(np.random.default_rng(0).integers(0, 255, (600, 600), np.uint8)), "", "IMAGE_TOO_LARGE"),
    ("empty", b"", "", "IMAGE_EMPTY"),
]


async def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving():
    s = settings(security__max_image_size_mb=0.3)  # a 600x600 noise PNG is ~360 KB, NIH PNGs ~100-250 KB
    good = cxr14_images(1)[0].read_bytes()
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        for label, data, ctype, want in BAD_INPUTS:
            data = good if data is None else good[: len(good) // 3] if data == "truncated" else data
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ClassifyImage(
                    pb.ClassifyImageRequest(image=common_pb2.Image(data=data, content_type=ctype)), metadata=auth()
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            assert reason(err.value) == want, (label, err.value.details())
        for names, labels, code, why in [
            (["no_such_model"], [], grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
            ([MULTI], ["abnormal"], grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_LABEL"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                req = pb.ClassifyImageRequest(image=png(), model_names=names, heatmap_labels=labels)
                await stub.ClassifyImage(req, metadata=auth())
            assert err.value.code() == code and reason(err.value) == why
        resp = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png()), metadata=auth())
        assert len(resp.predictions) == 2
        assert await health(ch) == SERVING


async def test_grad_cam_heatmaps_for_requested_findings():
    s = settings()
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        req = pb.ClassifyImageRequest(image=png(), heatmap_labels=["Cardiomegaly", "abnormal"])
        preds = by_model(await stub.ClassifyImage(req, metadata=auth()))
        with_maps = {f.label for p in preds.values() for f in p.findings if f.heatmap_png}
        assert with_maps == {"Cardiomegaly", "abnormal"}
        cardio = next(f for f in preds[MULTI].findings if f.label == "Cardiomegaly")
        img = Image.open(io.BytesIO(cardio.heatmap_png))
        assert img.format == "PNG" and img.size == (64, 64)


async def test_unload_and_load_models_drive_health(tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    net = torchvision.models.densenet121(weights=None, num_classes=14)
    torch.save(net.state_dict(), models_dir / "nih.pt")
    (models_dir / "broken.pt").write_bytes(b"not a checkpoint")
    s = settings(models_path=str(models_dir))
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        listed = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
        assert {m.name: m.state for m in listed.models} == {
            BINARY: common_pb2.MODEL_STATE_READY,
            MULTI: common_pb2.MODEL_STATE_READY,
        }
        assert list(next(m for m in listed.models if m.name == MULTI).labels) == list(NIH_LABELS)

        unloaded = await stub.UnloadModel(pb.UnloadModelRequest(model_name=MULTI), metadata=auth())
        assert unloaded.model.state == common_pb2.MODEL_STATE_UNLOADED
        await asyncio.sleep(0.1)
        assert await health(ch) == NOT_SERVING and await health(ch, "") == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ClassifyImage(pb.ClassifyImageRequest(image=png(), model_names=[MULTI]), metadata=auth())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png()), metadata=auth())
        assert [p.model.name for p in rest.predictions] == [BINARY]

        loaded = await stub.LoadModel(pb.LoadModelRequest(model_name=MULTI, checkpoint_path="nih.pt"), metadata=auth())
        assert loaded.model.state == common_pb2.MODEL_STATE_READY and not loaded.model.untrained
        assert loaded.model.version == checkpoint_version(models_dir / "nih.pt")
        await asyncio.sleep(0.1)
        assert await health(ch) == SERVING
        resp = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png(), model_names=[MULTI]), metadata=auth())
        assert resp.predictions[0].model.version == loaded.model.version and not resp.untrained

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(
                pb.LoadModelRequest(model_name=MULTI, checkpoint_path="../../etc/passwd"), metadata=auth()
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason(err.value) == "CHECKPOINT_PATH_OUTSIDE"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(pb.LoadModelRequest(model_name=MULTI, checkpoint_path="broken.pt"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "broken.pt" in err.value.details()
        # validate, then swap: the refused checkpoint did not take the served version down
        listed = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
        multi = next(m for m in listed.models if m.name == MULTI)
        assert multi.state == common_pb2.MODEL_STATE_READY and multi.version == loaded.model.version
        assert await health(ch) == SERVING
        again = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png(), model_names=[MULTI]), metadata=auth())
        assert again.predictions[0].model.version == loaded.model.version
        np.testing.assert_array_equal(probs(again.predictions[0]), probs(resp.predictions[0]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(pb.LoadModelRequest(model_name="nope"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_checkpoint_or_allow_untrained_the_service_stays_not_serving():
    models = models_config(allow_untrained=False)
    s = settings(models=models)
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        assert await health(ch) == NOT_SERVING
        listed = await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth())
        multi = next(m for m in listed.models if m.name == MULTI)
        assert multi.state == common_pb2.MODEL_STATE_FAILED and "allow_untrained" in multi.error


async def test_disabled_model_is_listed_and_loads_on_demand():
    models = models_config(enabled=False)
    s = settings(models=models)
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        assert await health(ch) == SERVING  # only enabled models gate readiness
        states = {m.name: m.state for m in (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models}
        assert states == {BINARY: common_pb2.MODEL_STATE_READY, MULTI: common_pb2.MODEL_STATE_UNLOADED}
        resp = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png()), metadata=auth())
        assert [p.model.name for p in resp.predictions] == [BINARY]
        await stub.LoadModel(pb.LoadModelRequest(model_name=MULTI), metadata=auth())
        resp = await stub.ClassifyImage(pb.ClassifyImageRequest(image=png()), metadata=auth())
        assert {p.model.name for p in resp.predictions} == {BINARY, MULTI}


@pytest.mark.slow
def test_module_entry_point_serves_local_config_on_cpu():
    """`python -m cxr_classification --config config/local.json` (both models at 224 px, untrained)."""
    env = {**os.environ, "CXR_LOG_LEVEL": "INFO", "CXR_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cxr_classification",
            "--config",
            str(REPO / "config/local.json"),
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        lines = []
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "".join(lines)

        async def call() -> pb.ClassifyImageResponse:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                while await health(ch) != SERVING:
                    assert time.monotonic() < deadline, "service did not become ready"
                    await asyncio.sleep(0.5)
                stub = pb_grpc.ClassificationServiceStub(ch)
                return await stub.ClassifyImage(
                    pb.ClassifyImageRequest(image=png()), metadata=(("x-api-key", "dev-key-change-me"),)
                )

        resp = asyncio.run(call())
        assert resp.untrained and {p.model.name for p in resp.predictions} == {BINARY, MULTI}
        assert len(by_model(resp)[MULTI].findings) == 14
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_two_model_instances_give_the_same_answers_and_heatmaps_as_one_at_a_time(mode):
    """model_instances runs forwards (and Grad-CAM) of the real networks two at once, on two threads
    or in two instance processes (each with its own copy of the untrained weights, drawn from the
    same seed): every concurrent answer equals the one computed alone."""
    s = settings(
        server_config__model_instances=2,
        server_config__model_instance_mode=mode,
        server_config__max_batch_size=1,
        server_config__max_batch_delay_ms=0,
    )
    labels = ["Cardiomegaly", "abnormal"]
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        reqs = [pb.ClassifyImageRequest(image=png(i), heatmap_labels=labels) for i in range(4)]
        alone = [by_model(await stub.ClassifyImage(r, metadata=auth(), timeout=120)) for r in reqs]
        together = await asyncio.gather(*(stub.ClassifyImage(r, metadata=auth(), timeout=120) for r in reqs * 2))
    for i, resp in enumerate(together):
        got, want = by_model(resp), alone[i % 4]
        for name in (BINARY, MULTI):
            np.testing.assert_allclose(probs(got[name]), probs(want[name]), atol=1e-5, rtol=0)
            maps = {f.label: _gray(f.heatmap_png) for f in got[name].findings if f.heatmap_png}
            expected = {f.label: _gray(f.heatmap_png) for f in want[name].findings if f.heatmap_png}
            assert maps.keys() == expected.keys() and maps  # each model drew its requested heatmap
            for label, heat in maps.items():
                np.testing.assert_allclose(heat, expected[label], atol=1, rtol=0)  # one gray level


async def test_use_amp_on_cpu_reports_its_precision_and_stays_close_to_float32():
    """performance.use_amp on CPU, with the model in an instance process: every prediction names the
    precision it ran in (bfloat16 where the CPU computes it natively, else float32), and the
    probabilities stay within 0.02 of the float32 service's."""
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    answers = {}
    for use_amp in (False, True):
        s = settings(performance__use_amp=use_amp, server_config__model_instance_mode="process")
        async with running_server(s, build_binding(s)) as server, channel(server) as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            answers[use_amp] = [
                by_model(await stub.ClassifyImage(pb.ClassifyImageRequest(image=png(i)), metadata=auth(), timeout=120))
                for i in range(3)
            ]
            listed = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
            assert {m.precision for m in listed.models} == {expected if use_amp else "float32"}
    for fp32, amp in zip(answers[False], answers[True], strict=True):
        for name in (BINARY, MULTI):
            assert amp[name].model.precision == expected and fp32[name].model.precision == "float32"
            np.testing.assert_allclose(probs(amp[name]), probs(fp32[name]), atol=0.02, rtol=0)


def _gray(png_data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_data)), dtype=np.int16)
