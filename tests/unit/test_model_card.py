"""model_card.py's error paths and defaults, on files written here: a corrupt, unreadable or non-object card
file, an incomplete evaluation, missing declared fields, a recorded evaluation that is not an object or is
of another version, and the card's reference to its file (never the server's folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import CheckpointError, InvalidInputError
from cxr_serving.lifecycle import ModelState, ModelStatus
from cxr_serving.model_card import (
    DEFAULT_INTENDED_USE,
    NOT_CLEARED,
    build_card,
    card_file,
    card_reference,
    evaluation_dict,
    read_card_file,
)


def _status(version: str = "abc123", checkpoint: str = "/srv/models/nih.pt") -> ModelStatus:
    return ModelStatus(
        name="m",
        state=ModelState.READY,
        version=version,
        untrained=version == "untrained",
        architecture="densenet121",
        labels=["A", "B"],
        task="classification",
        checkpoint=checkpoint,
        preprocessing={"input_size": "64x64"},
    )


def test_a_missing_card_file_is_an_empty_declaration(tmp_path: Path) -> None:
    assert read_card_file(tmp_path / "nope.pt.card.json") == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"intended_use": "triage",', "is unreadable: Expecting"),  # corrupt JSON (cut short)
        (b"\xff\xfe{}", "is unreadable"),  # not UTF-8
        (b'["intended_use"]', "is not a JSON object"),
        (b'"text"', "is not a JSON object"),
    ],
)
def test_a_bad_card_file_is_refused_naming_the_file_not_its_folder(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "nih.pt.card.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_card_file(path)
    assert e.value.reason == "MODEL_CARD_INVALID"
    assert f"model card nih.pt.card.json {message}" in e.value.message
    assert str(tmp_path) not in e.value.message


def test_an_unreadable_card_file_is_refused_without_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nih.pt.card.json"
    path.mkdir()  # reading it fails with an OSError whose text carries the full path
    with pytest.raises(CheckpointError) as e:
        read_card_file(path)
    assert e.value.reason == "MODEL_CARD_INVALID"
    assert e.value.message == "model card nih.pt.card.json is unreadable: Is a directory"


@pytest.mark.parametrize(
    "fields",
    [
        {"dataset_sha256": "ab" * 32, "dataset_images": 3},  # no model_version
        {"model_version": "abc123", "dataset_images": 3},  # no dataset hash
        {"model_version": "abc123", "dataset_sha256": "ab" * 32},  # no dataset size
        {"model_version": "abc123", "dataset_sha256": "ab" * 32, "dataset_images": -1},
    ],
)
def test_an_incomplete_evaluation_is_refused(fields: dict) -> None:
    with pytest.raises(InvalidInputError) as e:
        evaluation_dict(common_pb2.ModelEvaluation(**fields))
    assert e.value.reason == "EVALUATION_INCOMPLETE"


def test_missing_declared_fields_get_their_defaults() -> None:
    card = build_card(_status(), {}, "nih.pt.card.json")
    assert card.intended_use == DEFAULT_INTENDED_USE and card.training_data == ""
    assert card.regulatory_status == NOT_CLEARED and list(card.conflicts) == []
    assert "no evaluation recorded" in card.evaluation_note and not card.HasField("evaluation")
    untrained = build_card(_status("untrained", ""), {}, "in memory")
    assert untrained.training_data == "none: random weights" and untrained.regulatory_status.startswith("NOT FOR")


def test_recorded_evaluations_attach_only_as_an_object_of_the_serving_version() -> None:
    ev = {"model_version": "abc123", "dataset_sha256": "ab" * 32, "dataset_images": 3}
    assert build_card(_status(), {"evaluation": ev}, "f").evaluation.dataset_images == 3
    other = build_card(_status(), {"evaluation": {**ev, "model_version": "old999"}}, "f")
    assert not other.HasField("evaluation") and "'old999'" in other.evaluation_note
    junk = build_card(_status(), {"evaluation": ["not", "an", "object"], "colour": "red"}, "f")
    assert not junk.HasField("evaluation")
    assert list(junk.conflicts) == ["colour: unknown field, ignored", "evaluation: not a JSON object, ignored"]
    assert build_card(_status(), {}, "f").digest != build_card(_status(), {"evaluation": ev}, "f").digest


def test_the_card_reference_never_shows_the_servers_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "site").mkdir(parents=True)
    inside = card_file(str(models / "site" / "nih.pt"))
    assert card_reference(inside, models) == "site/nih.pt.card.json"
    assert card_reference(inside, Path(str(models) + "/./")) == "site/nih.pt.card.json"
    elsewhere = card_file(str(tmp_path / "configured" / "nih.pt"))  # a configured checkpoint outside models_path
    assert card_reference(elsewhere, models) == "nih.pt.card.json"
    assert card_reference(inside, None) == "nih.pt.card.json"


def _class(**fields) -> common_pb2.ClassSegmentationPerformance:
    base = {"class_name": "heart", "images": 3, "dice_mean": 0.5, "dice_ci_low": 0.4, "dice_ci_high": 0.6}
    return common_pb2.ClassSegmentationPerformance(**(base | fields))


def _seg_evaluation(*classes: common_pb2.ClassSegmentationPerformance, **fields) -> common_pb2.ModelEvaluation:
    base = {"model_version": "abc123", "dataset_sha256": "ab" * 32, "dataset_images": 3}
    return common_pb2.ModelEvaluation(**(base | fields), classes=list(classes))


def test_a_segmentation_evaluation_is_kept_and_attached_with_its_dice_and_hd95() -> None:
    heart = _class(hd95_images=2, hd95_mean=4.5, hd95_ci_low=3.0, hd95_ci_high=6.0)
    stored = evaluation_dict(_seg_evaluation(heart, macro_dice=0.5), ["heart", "left_lung"])
    assert stored["classes"] == [
        {"class_name": "heart", "images": 3, "dice_mean": 0.5, "dice_ci_low": 0.4, "dice_ci_high": 0.6,
         "hd95_images": 2, "hd95_mean": 4.5, "hd95_ci_low": 3.0, "hd95_ci_high": 6.0}
    ]  # fmt: skip
    card = build_card(_status(), {"evaluation": stored}, "f")
    assert card.evaluation.classes[0] == heart and card.evaluation.macro_dice == 0.5


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        (_seg_evaluation(_class(class_name="")), "each class needs a name"),
        (_seg_evaluation(_class(), _class()), "each class needs a name"),
        (_seg_evaluation(_class(class_name="spleen")), "'spleen' is not a class of the model"),
        (_seg_evaluation(_class(images=4)), "4 images (0 with HD95) of a dataset of 3"),
        (_seg_evaluation(_class(images=0)), "0 images"),
        (_seg_evaluation(_class(hd95_images=4)), "(4 with HD95)"),
        (_seg_evaluation(_class(dice_ci_high=1.5)), "a Dice outside [0, 1]"),
        (
            _seg_evaluation(_class(), findings=[common_pb2.FindingPerformance(finding="heart")]),
            "findings (classification) or classes (segmentation), not both",
        ),
    ],
)
def test_a_segmentation_evaluation_unfit_for_a_card_is_refused(
    evaluation: common_pb2.ModelEvaluation, message: str
) -> None:
    with pytest.raises(InvalidInputError) as e:
        evaluation_dict(evaluation, ["heart", "left_lung"])
    assert e.value.reason == "EVALUATION_INCOMPLETE" and message in e.value.message
