"""The model card of a served version: derived from the loaded model, declared next to its checkpoint.

A card is stored as `<checkpoint>.card.json` beside the checkpoint file. Whoever loads the model declares
`intended_use` and `training_data` there; `cxr evaluate --record-card` adds `evaluation` (RecordModelEvaluation):
AUROC per finding of a classifier, or Dice and HD95 per class of a segmentation model.
The name, version, architecture, labels, task and preprocessing are always the loaded model's own: a
declaration may state them (to pin what it was written for), and one that contradicts the loaded model is
flagged in `conflicts` and never served in their place, as is any key this module does not know. An
untrained model has no checkpoint: its card is derived and kept in memory, and so is its evaluation.
No gRPC here: the servicer maps the ModelCard message and nothing more.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format

from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import CheckpointError, InvalidInputError
from cxr_serving.lifecycle import ModelStatus

CARD_SUFFIX: Final = ".card.json"
DECLARED: Final = ("intended_use", "training_data")
CHECKED: Final = ("name", "version", "architecture", "labels", "task")  # derived: a declaration may only agree
EVALUATION: Final = "evaluation"
IN_MEMORY: Final = "in memory (untrained: no checkpoint)"
NOT_CLEARED: Final = "NOT FOR DIAGNOSTIC USE: not cleared as a medical device; research use only"
UNTRAINED_STATUS: Final = "NOT FOR DIAGNOSTIC USE: untrained (random weights); outputs are meaningless"
DEFAULT_INTENDED_USE: Final = "not declared (write intended_use in the card file next to the checkpoint)"


def card_file(checkpoint: str) -> Path:
    return Path(checkpoint + CARD_SUFFIX)


def card_reference(path: Path, models_path: Path | None) -> str:
    """The card file as callers see it: relative to `models_path`, or its file name when it lies elsewhere
    (a configured checkpoint); never the server's absolute path."""
    if models_path is not None:
        root = models_path.resolve()
        if path.resolve().is_relative_to(root):
            return path.resolve().relative_to(root).as_posix()
    return path.name


def read_card_file(path: Path) -> dict[str, Any]:
    """The card file's JSON object ({} when there is none); FAILED_PRECONDITION for one that is unreadable
    or no JSON object, naming the file but not the folder it is in."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:  # str(exc) would carry the full path
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"model card {path.name} is unreadable: {reason}", reason="MODEL_CARD_INVALID") from exc
    except ValueError as exc:  # invalid JSON or UTF-8: the message holds positions, no path
        raise CheckpointError(f"model card {path.name} is unreadable: {exc}", reason="MODEL_CARD_INVALID") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"model card {path.name} is not a JSON object", reason="MODEL_CARD_INVALID")
    return data


def write_card_file(path: Path, data: dict[str, Any]) -> None:
    """Replace the card file atomically, so a reader never sees half a card."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluation_dict(evaluation: common_pb2.ModelEvaluation, labels: Sequence[str] = ()) -> dict[str, Any]:
    """A ModelEvaluation checked for recording, as the card file stores it; INVALID_ARGUMENT when incomplete."""
    if not evaluation.model_version:
        raise InvalidInputError("evaluation.model_version is required", reason="EVALUATION_INCOMPLETE")
    if not evaluation.dataset_sha256 or evaluation.dataset_images <= 0:
        raise InvalidInputError(
            "evaluation.dataset_sha256 and a positive dataset_images are required", reason="EVALUATION_INCOMPLETE"
        )
    if evaluation.findings and evaluation.classes:
        raise InvalidInputError(
            "an evaluation has findings (classification) or classes (segmentation), not both",
            reason="EVALUATION_INCOMPLETE",
        )
    problems = _class_problems(evaluation, labels)
    if problems:
        raise InvalidInputError(f"evaluation.classes: {'; '.join(problems)}", reason="EVALUATION_INCOMPLETE")
    return json_format.MessageToDict(evaluation, preserving_proto_field_name=True)


def _class_problems(evaluation: common_pb2.ModelEvaluation, labels: Sequence[str]) -> list[str]:
    """What makes a segmentation evaluation's per-class results unfit for a card: a class without a name,
    named twice or not among the model's `labels` (when given), counted over no image or over more images
    than the dataset, or a Dice off [0, 1]."""
    problems, seen = [], set()
    for c in evaluation.classes:
        if not c.class_name or c.class_name in seen:
            problems.append(f"class {c.class_name!r}: each class needs a name of its own")
        seen.add(c.class_name)
        if labels and c.class_name not in labels:
            problems.append(f"class {c.class_name!r} is not a class of the model; its classes are {list(labels)}")
        if not 0 < c.images <= evaluation.dataset_images or not 0 <= c.hd95_images <= c.images:
            problems.append(
                f"class {c.class_name!r}: {c.images} images ({c.hd95_images} with HD95) of a dataset of "
                f"{evaluation.dataset_images}"
            )
        dices = (c.dice_mean, c.dice_ci_low, c.dice_ci_high)
        if any(not 0.0 <= d <= 1.0 for d in dices if not math.isnan(d)):
            problems.append(f"class {c.class_name!r}: a Dice outside [0, 1]: {dices}")
    return problems


def build_card(status: ModelStatus, declared: dict[str, Any], source: str) -> common_pb2.ModelCard:
    """The card of the version `status` describes, from the declaration (and recorded evaluation) in `declared`."""
    derived: dict[str, Any] = {
        "name": status.name,
        "version": status.version,
        "architecture": status.architecture,
        "labels": list(status.labels),
        "task": status.task,
    }
    conflicts = [
        f"{key}: declared {declared[key]!r}, but the loaded model's is {derived[key]!r}"
        for key in CHECKED
        if key in declared and declared[key] != derived[key]
    ]
    conflicts += [f"{key}: unknown field, ignored" for key in sorted(set(declared) - {*DECLARED, *CHECKED, EVALUATION})]
    card = common_pb2.ModelCard(
        **derived,
        untrained=status.untrained,
        preprocessing=status.preprocessing,
        intended_use=str(declared.get("intended_use") or DEFAULT_INTENDED_USE),
        training_data=str(declared.get("training_data") or ("none: random weights" if status.untrained else "")),
        regulatory_status=UNTRAINED_STATUS if status.untrained else NOT_CLEARED,
        source=source,
        conflicts=conflicts,
    )
    recorded = declared.get(EVALUATION)
    if isinstance(recorded, dict):
        evaluation = json_format.ParseDict(recorded, common_pb2.ModelEvaluation(), ignore_unknown_fields=True)
        if evaluation.model_version == status.version:
            card.evaluation.CopyFrom(evaluation)
        else:
            card.evaluation_note = (
                f"the recorded evaluation is of version {evaluation.model_version!r}, not the serving version "
                f"{status.version!r}: not attached; run `cxr evaluate --record-card` on this version"
            )
    elif recorded is not None:
        card.conflicts.append("evaluation: not a JSON object, ignored")
    if not card.HasField("evaluation") and not card.evaluation_note:
        card.evaluation_note = "no evaluation recorded for this version (`cxr evaluate --record-card`)"
    card.digest = hashlib.sha256(card.SerializeToString(deterministic=True)).hexdigest()
    return card
