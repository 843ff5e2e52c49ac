"""Models are data: a classifier or a segmenter declared only in `models.*` (a `task` and an
`architecture`) is served by the real service over gRPC on 127.0.0.1, with real NIH PNGs.

Models run untrained at 64 px to keep CPU time small.
"""

from __future__ import annotations

import grpc
import pytest

from cxr_classification.service import build_binding as classification_binding
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc
from cxr_segmentation.config import DEFAULT_CLASSES
from cxr_segmentation.service import build_binding as segmentation_binding
from tests.support.paths import cxr14_images
from tests.support.servers import auth, make_settings, running_server

SCREEN = "effusion_screen"
LUNGS = "lungs_fpn"


def settings(models: dict) -> object:
    return make_settings(models=models, server_config__max_batch_delay_ms=5, performance__warmup_batches=0)


def nih_png(i: int = 0) -> common_pb2.Image:
    return common_pb2.Image(data=cxr14_images(i + 1)[i].read_bytes(), content_type="image/png")


def channel(server) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


async def test_a_third_classifier_declared_only_in_config_is_listed_and_answers():
    models = {
        "binary_classifier": {"model_type": "swin_transformer", "allow_untrained": True, "input_size": 64},
        "multiclass_classifier": {"architecture": "densenet121", "allow_untrained": True, "input_size": 64},
        SCREEN: {
            "task": "binary_classification",
            "architecture": "densenet121",
            "labels": ["Effusion"],
            "thresholds": 0.4,
            "allow_untrained": True,
            "input_size": 64,
        },
    }
    s = settings(models)
    async with running_server(s, classification_binding(s)) as server, channel(server) as ch:
        stub = cls_grpc.ClassificationServiceStub(ch)
        listed = {m.name: m for m in (await stub.ListModels(cls_pb.ListModelsRequest(), metadata=auth())).models}
        assert list(listed) == ["binary_classifier", "multiclass_classifier", SCREEN]
        screen = listed[SCREEN]
        assert screen.task == "binary_classification" and screen.architecture == "densenet121"
        assert list(screen.labels) == ["Effusion"] and screen.state == common_pb2.MODEL_STATE_READY
        assert listed["multiclass_classifier"].task == "multilabel_classification"
        assert listed["binary_classifier"].task == "binary_classification"

        resp = await stub.ClassifyImage(
            cls_pb.ClassifyImageRequest(image=nih_png(), model_names=[SCREEN]), metadata=auth()
        )
        (pred,) = resp.predictions
        assert pred.model.name == SCREEN and pred.model.untrained and resp.untrained
        (finding,) = pred.findings
        assert (
            finding.label == "Effusion" and 0.0 < finding.probability < 1.0 and finding.threshold == pytest.approx(0.4)
        )
        assert finding.positive == (finding.probability >= finding.threshold)

        every = await stub.ClassifyImage(cls_pb.ClassifyImageRequest(image=nih_png()), metadata=auth())
        by_name = {p.model.name: p for p in every.predictions}
        assert set(by_name) == {"binary_classifier", "multiclass_classifier", SCREEN}
        assert by_name[SCREEN].findings[0].probability == pytest.approx(finding.probability, abs=1e-5)
        assert len(by_name["multiclass_classifier"].findings) == 14


async def test_a_second_segmenter_declared_only_in_config_is_served_by_name():
    small = {"allow_untrained": True, "encoder": "resnet18", "input_size": 64}
    models = {
        "segmentation": small,
        LUNGS: {
            **small,
            "task": "segmentation",
            "architecture": "FPN",
            "classes": ["left_lung", "right_lung"],
            "max_batch_size": 2,
        },
    }
    s = settings(models)
    binding = segmentation_binding(s)
    async with running_server(s, binding) as server, channel(server) as ch:
        stub = seg_grpc.SegmentationServiceStub(ch)
        listed = {m.name: m for m in (await stub.ListModels(seg_pb.ListModelsRequest(), metadata=auth())).models}
        assert list(listed) == ["segmentation", LUNGS]
        assert all(m.task == "segmentation" and m.state == common_pb2.MODEL_STATE_READY for m in listed.values())
        assert listed[LUNGS].architecture == "smp:FPN/resnet18"
        # each model batches with its own limit: the second one's max_batch_size is 2, the default's the server's
        repo = binding.repository
        assert repo.batcher(LUNGS).max_batch_size == 2
        assert repo.batcher("segmentation").max_batch_size == s.server_config.max_batch_size != 2

        lungs = await stub.SegmentImage(seg_pb.SegmentImageRequest(image=nih_png(), model_name=LUNGS), metadata=auth())
        assert lungs.model.name == LUNGS and lungs.model.untrained
        assert [m.label for m in lungs.masks] == ["left_lung", "right_lung"]
        assert all((m.width, m.height) == (lungs.image.width, lungs.image.height) for m in lungs.masks)

        default = await stub.SegmentImage(seg_pb.SegmentImageRequest(image=nih_png()), metadata=auth())
        assert default.model.name == "segmentation" and [m.label for m in default.masks] == list(DEFAULT_CLASSES)
