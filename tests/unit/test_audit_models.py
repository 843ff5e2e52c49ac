"""The audit line's `models` (name@version of every ModelInfo in a response, two levels deep) read along
per-type paths equal what a reflective walk over every set field finds, for every response message of
every service, filled at random."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.dicom.v1 import dicom_service_pb2 as dicom_pb
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_serving.audit import MAX_ITEMS_READ, MODEL_INFO, models_in


def reflective(message: Any, depth: int = 0) -> set[str]:
    """The reference: every set field, recursively (what the audit read before it had per-type paths)."""
    found: set[str] = set()
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or kind.GetOptions().map_entry:
            continue
        values = value if field.is_repeated else [value]
        if kind.full_name == MODEL_INFO:
            found.update(f"{v.name}@{v.version or 'unversioned'}" for v in values)
        elif depth < 2:
            for v in list(values)[:MAX_ITEMS_READ]:
                found |= reflective(v, depth + 1)
    return found


def fill(message: Any, rng: random.Random, depth: int = 0) -> None:
    """Set message fields at random (a ModelInfo gets a random name and version, sometimes none)."""
    if message.DESCRIPTOR.full_name == MODEL_INFO:
        message.name = f"m{rng.randrange(100)}"
        message.version = rng.choice(["", "v1", f"v{rng.randrange(9)}"])
        return
    for field in message.DESCRIPTOR.fields:
        kind = field.message_type
        if kind is None or kind.GetOptions().map_entry or depth > 4 or rng.random() < 0.4:
            continue
        if field.is_repeated:
            for _ in range(rng.choice([0, 1, 2, 3, MAX_ITEMS_READ + 6] if depth == 1 else [0, 1, 2, 3])):
                fill(getattr(message, field.name).add(), rng, depth + 1)
        elif rng.random() < 0.15:
            getattr(message, field.name).SetInParent()  # set but empty
        else:
            fill(getattr(message, field.name), rng, depth + 1)


RESPONSES = sorted(
    (
        cls
        for module in (cls_pb, seg_pb, rag_pb, dicom_pb, common_pb2)
        for name, cls in vars(module).items()
        if name.endswith("Response") and hasattr(cls, "DESCRIPTOR")
    ),
    key=lambda c: c.DESCRIPTOR.full_name,
)


def test_every_service_has_responses_that_carry_model_info():
    carrying = [c for c in RESPONSES if reflective(_filled(c, 0))]
    assert len(RESPONSES) >= 20 and len(carrying) >= 8, [c.DESCRIPTOR.full_name for c in carrying]


def _filled(cls: Any, seed: int) -> Any:
    message = cls()
    fill(message, random.Random(seed))
    return message


@pytest.mark.parametrize("cls", RESPONSES, ids=lambda c: c.DESCRIPTOR.name)
def test_models_in_equals_a_reflective_walk(cls):
    for seed in range(25):
        message = _filled(cls, seed)
        assert models_in(message) == sorted(reflective(message)), seed


def test_nested_results_unset_and_empty_model_info():
    response = cls_pb.ClassifyImagesResponse()
    for i in range(3):
        result = response.results.add(index=i)
        result.predictions.add().model.name = "densenet"
        result.predictions[0].model.version = f"v{i % 2}"
    response.results.add(index=3).predictions.add()  # a prediction without a model: nothing
    single = cls_pb.ClassifyImageResponse()
    single.predictions.add().model.SetInParent()  # set, but empty
    assert models_in(response) == ["densenet@v0", "densenet@v1"]
    assert models_in(single) == ["@unversioned"]
    assert models_in(object()) == []


def test_only_the_first_items_of_a_long_list_are_read():
    response = cls_pb.ClassifyImagesResponse()
    for i in range(MAX_ITEMS_READ + 5):
        response.results.add(index=i).predictions.add().model.name = f"m{i:03d}"
    assert models_in(response) == [f"m{i:03d}@unversioned" for i in range(MAX_ITEMS_READ)]


def test_two_message_types_of_one_name_keep_their_own_paths():
    """Plans are per descriptor: a type named like another (another descriptor pool) does not take its paths."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    def response_type(with_model: bool) -> Any:
        pool = descriptor_pool.DescriptorPool()
        fd = descriptor_pb2.FileDescriptorProto(name="same.proto", package="cxr.common.v1")
        info = fd.message_type.add(name="ModelInfo")
        info.field.add(name="name", number=1, type=9, label=1)
        info.field.add(name="version", number=2, type=9, label=1)
        resp = fd.message_type.add(name="SameNameResponse")
        if with_model:
            resp.field.add(name="model", number=1, type=11, label=1, type_name=".cxr.common.v1.ModelInfo")
        else:
            resp.field.add(name="other", number=1, type=9, label=1)
        pool.Add(fd)
        return message_factory.GetMessageClass(pool.FindMessageTypeByName("cxr.common.v1.SameNameResponse"))

    without, with_model = response_type(False), response_type(True)
    assert models_in(without(other="x")) == []  # its (empty) plan is made first
    message = with_model()
    message.model.name, message.model.version = "m", "1"
    assert models_in(message) == ["m@1"]
