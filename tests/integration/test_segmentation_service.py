"""The segmentation service end to end: a real grpc.aio server on port 0, real NIH PNGs and DICOMs,
a small untrained U-Net (input_size 64) on the CPU."""

import asyncio
import io
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image as PILImage

from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from cxr_segmentation.masks import decode_png, decode_rle
from cxr_segmentation.service import build_binding, build_model
from cxr_serving.lifecycle import checkpoint_version
from tests.support.paths import REPO, cxr14_images, dicom_files
from tests.support.servers import auth, free_port, make_settings, running_server

SEG = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}
CLASSES = ["left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]


def settings(**seg):
    return make_settings(models__segmentation={**SEG, **seg}, server_config__max_batch_delay_ms=2)


def png_request(path, **kw):
    return pb.SegmentImageRequest(image=common_pb2.Image(data=path.read_bytes(), content_type="image/png"), **kw)


def dicom_request(path, **kw):
    return pb.SegmentImageRequest(
        image=common_pb2.Image(data=path.read_bytes(), content_type="application/dicom"), **kw
    )


def stub_for(server):
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return ch, pb_grpc.SegmentationServiceStub(ch)


async def test_nih_png_masks_have_input_size_and_rle_decodes_to_the_png():
    s = settings()
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            for path in cxr14_images(2):
                size = PILImage.open(path).size
                as_png = await stub.SegmentImage(png_request(path, threshold=0.5), metadata=auth())
                as_rle = await stub.SegmentImage(
                    png_request(path, threshold=0.5, mask_encoding=pb.MASK_ENCODING_RLE), metadata=auth()
                )
                assert as_png.untrained and as_png.model.version == "untrained" and as_png.model.untrained
                assert [m.label for m in as_png.masks] == CLASSES
                assert (as_png.image.width, as_png.image.height) == size
                for p, r in zip(as_png.masks, as_rle.masks, strict=True):
                    mask = decode_png(p.png)
                    assert (p.width, p.height) == size and mask.shape == (size[1], size[0])
                    assert not r.png and list(r.rle.size) == [size[1], size[0]]
                    np.testing.assert_array_equal(decode_rle(r.rle.size, r.rle.counts), mask)
                    assert p.area_pixels == int(mask.sum()) == r.area_pixels
                    assert p.area_mm2 == 0.0  # PNG carries no pixel spacing
                    if p.area_pixels:
                        ys, xs = np.nonzero(mask)
                        b = p.bounding_box
                        assert (b.x_min, b.y_min, b.x_max, b.y_max) == (xs.min(), ys.min(), xs.max(), ys.max())
                    else:
                        assert not p.HasField("bounding_box")
            # class filter and NONE encoding
            only = await stub.SegmentImage(
                png_request(path, classes=["heart"], mask_encoding=pb.MASK_ENCODING_NONE), metadata=auth()
            )
            assert [m.label for m in only.masks] == ["heart"] and not only.masks[0].png
            models = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
            assert models.models[0].name == "segmentation" and models.models[0].labels == CLASSES
            assert models.models[0].state == common_pb2.MODEL_STATE_READY


async def test_dicom_samples_report_area_in_mm2_from_pixel_spacing():
    s = settings()
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            areas = {}
            for path in dicom_files():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                row, col = (float(v) for v in ds.PixelSpacing)
                resp = await stub.SegmentImage(
                    dicom_request(path, threshold=0.3, mask_encoding=pb.MASK_ENCODING_NONE), metadata=auth()
                )
                assert (resp.image.height, resp.image.width) == (ds.Rows, ds.Columns)
                assert resp.image.pixel_spacing_row_mm == pytest.approx(row)
                assert sum(m.area_pixels for m in resp.masks) > 0, path.name
                for m in resp.masks:
                    assert (m.height, m.width) == (ds.Rows, ds.Columns)
                    assert m.area_mm2 == pytest.approx(m.area_pixels * row * col)
                areas[path.name] = [m.area_pixels for m in resp.masks]
                meas = resp.measurements
                if meas.cardiothoracic_ratio:
                    assert meas.heart_width_mm == pytest.approx(meas.heart_width_px * col)
                    assert meas.cardiothoracic_ratio == pytest.approx(meas.heart_width_px / meas.thorax_width_px)
                else:
                    assert meas.cardiothoracic_ratio_unavailable_reason
            # MONOCHROME1 stored inverted decodes to the same picture (up to float rounding): the same masks
            mono1, mono2 = areas["nih-dx-mono1-8bit.dcm"], areas["nih-dx-mono2-8bit.dcm"]
            assert mono1 == pytest.approx(mono2, rel=1e-3, abs=64)


async def test_dicom_seg_and_overlay_round_trip():
    s = settings()
    path = next(p for p in dicom_files() if p.name == "nih-dx-mono2-8bit.dcm")
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            resp = await stub.SegmentImage(
                dicom_request(path, threshold=0.4, include_dicom_seg=True, include_overlay=True), metadata=auth()
            )
    source = pydicom.dcmread(path, stop_before_pixels=True)
    seg = pydicom.dcmread(io.BytesIO(resp.dicom_seg))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    assert [d.SegmentLabel for d in seg.SegmentSequence] == CLASSES
    frames = seg.pixel_array.reshape(len(CLASSES), source.Rows, source.Columns).astype(bool)
    for i, m in enumerate(resp.masks):
        np.testing.assert_array_equal(frames[i], decode_png(m.png))
    overlay = PILImage.open(io.BytesIO(resp.overlay_png))
    assert overlay.mode == "RGB" and overlay.size == (source.Columns, source.Rows)


async def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving():
    s = settings()
    good = png_request(cxr14_images(1)[0])
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            bad = [
                pb.SegmentImageRequest(image=common_pb2.Image(data=b"not an image at all")),
                pb.SegmentImageRequest(),
                pb.SegmentImageRequest(image=good.image, threshold=1.5),
                pb.SegmentImageRequest(image=good.image, threshold=-0.1),
                pb.SegmentImageRequest(image=good.image, classes=["spleen"]),
                pb.SegmentImageRequest(image=good.image, mask_encoding=99),
                pb.SegmentImageRequest(image=good.image, include_dicom_seg=True),
                pb.SegmentImageRequest(image=common_pb2.Image(data=good.image.data[:200], content_type="image/png")),
            ]
            for req in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SegmentImage(req, metadata=auth())
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
                assert err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SegmentImage(pb.SegmentImageRequest(image=good.image, model_name="nope"), metadata=auth())
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            resp = await stub.SegmentImage(good, metadata=auth())
            assert len(resp.masks) == len(CLASSES)


async def test_load_unload_and_checkpoint_versions(tmp_path):
    s = make_settings(models__segmentation=SEG, server_config__max_batch_delay_ms=2, models_path=str(tmp_path))
    trained = build_model(s)
    net, _ = trained.build(None)
    torch.nn.init.constant_(net.segmentation_head[0].bias, 5.0)  # every pixel positive: a visible change
    ckpt = tmp_path / "seg.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"segmentation_head.0.weight": torch.zeros(2, 16, 3, 3)}, wrong)
    image = png_request(cxr14_images(1)[0]).image
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            unloaded = await stub.UnloadModel(pb.UnloadModelRequest(model_name="segmentation"), metadata=auth())
            assert unloaded.model.state == common_pb2.MODEL_STATE_UNLOADED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SegmentImage(pb.SegmentImageRequest(image=image), metadata=auth())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            loaded = await stub.LoadModel(pb.LoadModelRequest(checkpoint_path=str(ckpt)), metadata=auth())
            assert loaded.model.state == common_pb2.MODEL_STATE_READY
            assert loaded.model.version == checkpoint_version(ckpt) and not loaded.model.untrained
            resp = await stub.SegmentImage(pb.SegmentImageRequest(image=image), metadata=auth())
            assert not resp.untrained and resp.model.version == checkpoint_version(ckpt)
            assert all(m.area_pixels == m.width * m.height for m in resp.masks)

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(pb.LoadModelRequest(checkpoint_path=str(wrong)), metadata=auth())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "segmentation_head.0.weight" in err.value.details() and "missing" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(pb.LoadModelRequest(checkpoint_path=str(tmp_path / "absent.pt")), metadata=auth())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # the refused checkpoints did not take the served model down
            resp = await stub.SegmentImage(pb.SegmentImageRequest(image=image), metadata=auth())
            assert resp.model.version == checkpoint_version(ckpt)

            back = await stub.LoadModel(pb.LoadModelRequest(), metadata=auth())
            assert back.model.untrained and back.model.version == "untrained"


async def test_refuses_to_start_untrained_unless_allowed():
    s = settings(allow_untrained=False)
    async with running_server(s, build_binding(s), wait_ready=False) as server:
        ch, stub = stub_for(server)
        async with ch:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                models = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
                if models.models[0].state == common_pb2.MODEL_STATE_FAILED:
                    break
                await asyncio.sleep(0.05)
            assert models.models[0].state == common_pb2.MODEL_STATE_FAILED
            assert "checkpoint_path" in models.models[0].error


def test_main_serves_local_config_on_cpu_untrained():
    """`python -m cxr_segmentation --config config/local.json` serves, and says untrained."""
    port = free_port()
    env = {**os.environ, "CXR_MODELS__SEGMENTATION__INPUT_SIZE": "128", "CXR_API_KEY": "k-main-test"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cxr_segmentation",
            "--config",
            "config/local.json",
            "--port",
            str(port),
            "--metrics-port",
            "0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.SegmentationServiceStub(ch)
            deadline, resp = time.monotonic() + 90, None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    resp = stub.SegmentImage(
                        png_request(cxr14_images(1)[0]), metadata=(("x-api-key", "k-main-test"),), timeout=10
                    )
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    time.sleep(0.5)
            assert resp is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
            assert resp.untrained and resp.model.version == "untrained" and len(resp.masks) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_disabled_model_is_not_loaded_at_start_but_can_be_loaded():
    s = settings(enabled=False)
    image = png_request(cxr14_images(1)[0]).image
    async with running_server(s, build_binding(s)) as server:  # ready: nothing required
        ch, stub = stub_for(server)
        async with ch:
            models = await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
            assert models.models[0].state == common_pb2.MODEL_STATE_UNLOADED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SegmentImage(pb.SegmentImageRequest(image=image), metadata=auth())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            loaded = await stub.LoadModel(pb.LoadModelRequest(model_name="segmentation"), metadata=auth())
            assert loaded.model.state == common_pb2.MODEL_STATE_READY
            assert len((await stub.SegmentImage(pb.SegmentImageRequest(image=image), metadata=auth())).masks) == 5


async def test_masks_made_in_the_batch_are_served_identically():
    """The GPU path (masks made in the batch worker, forced here on the CPU) answers like the pool path."""
    path = cxr14_images(1)[0]
    responses = []
    for on_device in (False, True):
        s = settings(masks_on_device=on_device)
        async with running_server(s, build_binding(s)) as server:
            ch, stub = stub_for(server)
            async with ch:
                responses.append(await stub.SegmentImage(png_request(path, threshold=0.45), metadata=auth()))
    pool, device = responses
    assert [m.png for m in pool.masks] == [m.png for m in device.masks]
    assert pool.measurements == device.measurements


@pytest.mark.parametrize("on_device", [False, True])
async def test_instance_processes_answer_like_the_server_process(tmp_path, on_device):
    """model_instance_mode: process serves the same masks (logits or, on the device path, masks
    cross the instance socket), loads checkpoints in every instance, and the DICOM SEG names the
    loaded version although the server process itself never loads the model."""
    path = next(p for p in dicom_files() if p.name == "nih-dx-mono2-8bit.dcm")
    request = dicom_request(path, threshold=0.45, include_dicom_seg=True)
    thread_s = settings(masks_on_device=on_device)
    async with running_server(thread_s, build_binding(thread_s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            want = await stub.SegmentImage(request, metadata=auth())
    net, _ = build_model(thread_s).build(None)
    torch.nn.init.constant_(net.segmentation_head[0].bias, 5.0)
    ckpt = tmp_path / "seg.pt"
    torch.save(net.state_dict(), ckpt)
    s = make_settings(
        models__segmentation={**SEG, "masks_on_device": on_device},
        server_config__max_batch_delay_ms=2,
        server_config__model_instances=2,
        server_config__model_instance_mode="process",
        models_path=str(tmp_path),
    )
    async with running_server(s, build_binding(s)) as server:
        ch, stub = stub_for(server)
        async with ch:
            got = await asyncio.gather(*(stub.SegmentImage(request, metadata=auth()) for _ in range(4)))
            loaded = await stub.LoadModel(pb.LoadModelRequest(checkpoint_path=str(ckpt)), metadata=auth())
            after = await asyncio.gather(*(stub.SegmentImage(request, metadata=auth()) for _ in range(4)))
    for resp in got:
        assert [m.png for m in resp.masks] == [m.png for m in want.masks]
        assert resp.measurements == want.measurements and resp.model.version == "untrained"
    assert loaded.model.version == checkpoint_version(ckpt)
    for resp in after:  # both instances run the new weights
        assert all(m.area_pixels == m.width * m.height for m in resp.masks)
        seg = pydicom.dcmread(io.BytesIO(resp.dicom_seg))
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == (
            checkpoint_version(ckpt)
        )
