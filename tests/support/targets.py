"""The services the reliability tests run against: the toy (always) and every real service
whose package is importable, each with a small untrained CPU configuration, one valid
request and a set of malformed ones (NaN thresholds, empty lists, giant strings...)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from cxr_protos.common.v1 import common_pb2
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings
from fuzz.seeds import raster_variants
from tests.support.servers import make_settings

GIANT = "x" * 1_000_000
IMG = raster_variants()["png8.png"]


@dataclass
class Call:
    """One RPC: method name on the stub, the request, and whether it streams responses."""

    method: str
    request: Message
    streaming: bool = False


@dataclass
class Target:
    name: str
    module: str  # `python -m <module>` runs it as a process
    service: str  # services.<name> in the config
    settings: Callable[[], Settings]
    build: Callable[[Settings], ServiceBinding]
    stub: Callable[[Any], Any]
    valid: Callable[[bytes, str], Call]  # a good call around image bytes + content type
    malformed: list[Call] = field(default_factory=list)
    process_env: dict[str, str] = field(default_factory=dict)  # the same small config for `python -m`
    image_input: bool = True  # False: `valid` ignores the bytes (rag)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def toy() -> Target:
    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
    from tests.support.toy_service import build_toy

    def valid(data: bytes, ctype: str) -> Call:
        return Call("ClassifyImage", pb.ClassifyImageRequest(image=common_pb2.Image(data=data, content_type=ctype)))

    return Target(
        "toy",
        "tests.support.toy_service",
        "classification",
        lambda: make_settings(server_config__max_batch_delay_ms=1),
        build_toy,
        pb_grpc.ClassificationServiceStub,
        valid,
        [Call("ClassifyImage", pb.ClassifyImageRequest()), Call("ListModels", pb.ListModelsRequest())],
    )


def classification() -> Target:
    from cxr_classification.service import build_binding
    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    models = {
        "binary_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": 64},
        "multiclass_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": 64},
    }

    def valid(data: bytes, ctype: str) -> Call:
        return Call("ClassifyImage", pb.ClassifyImageRequest(image=common_pb2.Image(data=data, content_type=ctype)))

    img = common_pb2.Image(data=IMG, content_type="image/png")
    return Target(
        "classification",
        "cxr_classification",
        "classification",
        lambda: make_settings(models=models, server_config__max_batch_delay_ms=1, performance__warmup_batches=0),
        build_binding,
        pb_grpc.ClassificationServiceStub,
        valid,
        [
            Call("ClassifyImage", pb.ClassifyImageRequest()),
            Call("ClassifyImage", pb.ClassifyImageRequest(image=img, model_names=[GIANT])),
            Call("ClassifyImage", pb.ClassifyImageRequest(image=img, model_names=[""])),
            Call("ClassifyImage", pb.ClassifyImageRequest(image=img, heatmap_labels=[GIANT])),
            Call("ClassifyImage", pb.ClassifyImageRequest(image=img, model_names=["binary_classifier"] * 1000)),
            Call("ClassifyImage", pb.ClassifyImageRequest(image=img, priority=99)),  # type: ignore[arg-type]
            Call("ClassifyImages", pb.ClassifyImagesRequest()),
            Call("ClassifyImages", pb.ClassifyImagesRequest(images=[common_pb2.Image()] * 3)),
            Call("ClassifyImages", pb.ClassifyImagesRequest(images=[img], model_names=[GIANT])),
            Call("StreamClassifyImages", pb.StreamClassifyImagesRequest(), streaming=True),
            Call("StreamClassifyImages", pb.StreamClassifyImagesRequest(images=[img], model_names=["?"]), True),
            Call("LoadModel", pb.LoadModelRequest(model_name=GIANT)),
            Call("LoadModel", pb.LoadModelRequest(model_name="")),
            Call("UnloadModel", pb.UnloadModelRequest(model_name=GIANT)),
            Call("ListModels", pb.ListModelsRequest()),
        ],
        {f"CXR_MODELS__{k.upper()}": json.dumps(v) for k, v in models.items()}
        | {"CXR_PERFORMANCE__WARMUP_BATCHES": "0"},
    )


def segmentation() -> Target:
    from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
    from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
    from cxr_segmentation.service import build_binding

    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}

    def valid(data: bytes, ctype: str) -> Call:
        return Call("SegmentImage", pb.SegmentImageRequest(image=common_pb2.Image(data=data, content_type=ctype)))

    img = common_pb2.Image(data=IMG, content_type="image/png")
    nan = float("nan")
    return Target(
        "segmentation",
        "cxr_segmentation",
        "segmentation",
        lambda: make_settings(
            models__segmentation=seg, server_config__max_batch_delay_ms=1, performance__warmup_batches=0
        ),
        build_binding,
        pb_grpc.SegmentationServiceStub,
        valid,
        [
            Call("SegmentImage", pb.SegmentImageRequest()),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, threshold=nan)),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, threshold=float("inf"))),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, threshold=-1.0)),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, threshold=2.0)),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, classes=[GIANT])),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, classes=[""])),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, model_name=GIANT)),
            Call("SegmentImage", pb.SegmentImageRequest(image=img, mask_encoding=99)),  # type: ignore[arg-type]
            Call("SegmentImage", pb.SegmentImageRequest(image=img, priority=99)),  # type: ignore[arg-type]
            Call("SegmentImage", pb.SegmentImageRequest(image=img, include_dicom_seg=True)),  # PNG: no DICOM source
            Call("LoadModel", pb.LoadModelRequest(model_name=GIANT)),
            Call("LoadModel", pb.LoadModelRequest(model_name="")),
            Call("UnloadModel", pb.UnloadModelRequest(model_name=GIANT)),
            Call("ListModels", pb.ListModelsRequest()),
        ],
        {"CXR_MODELS__SEGMENTATION": json.dumps(seg), "CXR_PERFORMANCE__WARMUP_BATCHES": "0"},
    )


def rag() -> Target:
    from cxr_protos.rag.v1 import rag_service_pb2 as pb
    from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
    from cxr_rag.config import rag_config
    from cxr_rag.service import build_binding
    from tests.support.rag import shared_store

    def settings() -> Settings:  # extractive answers (no LLM configured) over the PubMedQA subset store
        return make_settings(models={"rag": {"vector_db_path": str(shared_store()), "documents_path": None}})

    def valid(data: bytes, ctype: str) -> Call:
        return Call("SearchLiterature", pb.SearchLiteratureRequest(query="pneumothorax after chest tube removal"))

    nan, inf = float("nan"), float("inf")
    q = "Is chest radiography useful after chest tube removal?"
    return Target(
        "rag",
        "cxr_rag",
        "rag",
        settings,
        lambda s: build_binding(s, rag_config(s, environ={})),
        pb_grpc.RagServiceStub,
        valid,
        [
            Call("AnswerQuestion", pb.AnswerQuestionRequest()),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=GIANT)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, temperature=nan)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, temperature=inf)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, temperature=-1.0)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, top_k=-1)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, top_k=2**31 - 1)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, max_tokens=-5)),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, mode=99)),  # type: ignore[arg-type]
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, filters={GIANT[:10000]: GIANT[:10000]})),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question=q, filters={"": ""})),
            Call("AnswerQuestion", pb.AnswerQuestionRequest(question="\x00\ud7ff" * 100)),
            Call("StreamAnswer", pb.StreamAnswerRequest(), streaming=True),
            Call("StreamAnswer", pb.StreamAnswerRequest(question=q, temperature=nan, top_k=-3), streaming=True),
            Call("SearchLiterature", pb.SearchLiteratureRequest()),
            Call("SearchLiterature", pb.SearchLiteratureRequest(query=GIANT)),
            Call("SearchLiterature", pb.SearchLiteratureRequest(query=q, top_k=10**6)),
            Call("IngestDocuments", pb.IngestDocumentsRequest()),
            Call("IngestDocuments", pb.IngestDocumentsRequest(documents=[pb.Document()])),
            Call("IngestDocuments", pb.IngestDocumentsRequest(documents=[pb.Document(id=GIANT[:5000], text="")])),
        ],
        {},
        image_input=False,
    )


FACTORIES: dict[str, tuple[str | None, Callable[[], Target]]] = {
    "toy": (None, toy),
    "classification": ("cxr_classification.service", classification),
    "segmentation": ("cxr_segmentation.service", segmentation),
    "rag": ("cxr_rag.service", rag),
}


def available_targets(*, include_toy: bool = True, images_only: bool = False) -> list[Target]:
    out = []
    for name, (module, factory) in FACTORIES.items():
        if name == "toy" and not include_toy:
            continue
        if module is None or _available(module.split(".")[0]):
            try:
                target = factory()
            except ImportError:  # package present but not complete yet
                continue
            if target.image_input or not images_only:
                out.append(target)
    return out


def target_names(*, include_toy: bool = True) -> list[str]:
    return [t.name for t in available_targets(include_toy=include_toy)]
