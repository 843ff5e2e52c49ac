"""`models.*` as data: each entry's `task` picks the service and schema, `architecture` the network; a bad
entry stops the service at start with a ConfigError naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_classification.config import BinaryClassifierConfig, MultiLabelClassifierConfig, classifier_configs
from cxr_segmentation.service import segmentation_configs
from cxr_serving.errors import ConfigError
from cxr_serving.model_tasks import model_tasks
from cxr_serving.settings import load_settings
from tests.support.servers import make_settings

REPO = Path(__file__).resolve().parents[2]
SCREEN = {"task": "binary_classification", "architecture": "densenet121", "labels": ["Effusion"]}


def test_any_named_entry_is_served_by_the_service_of_its_task():
    s = make_settings(
        models={
            "effusion_screen": SCREEN,
            "findings_small": {
                "task": "multilabel_classification",
                "architecture": "timm",
                "timm_name": "resnet18",
                "labels": ["Effusion", "Mass"],
            },
            "lungs": {"task": "segmentation", "architecture": "FPN", "classes": ["left_lung", "right_lung"]},
            "rag": {"collection": "medical_literature"},  # a service's own section: no task, not a model
        }
    )
    configs = classifier_configs(s)
    assert list(configs) == ["effusion_screen", "findings_small"]
    screen, small = configs["effusion_screen"], configs["findings_small"]
    assert isinstance(screen, BinaryClassifierConfig) and screen.output_labels == ["Effusion"]
    assert screen.architecture == "densenet121" and screen.task == "binary_classification"
    assert isinstance(small, MultiLabelClassifierConfig) and small.architecture == "resnet18" and small.head_size == 2
    (lungs,) = segmentation_configs(s)
    assert (lungs.name, lungs.architecture, lungs.classes) == ("lungs", "FPN", ["left_lung", "right_lung"])
    assert model_tasks(s, ("segmentation",)) == {"lungs": "segmentation"}


def test_shipped_configs_declare_task_and_architecture_explicitly():
    for name in ("local.json", "production.json"):
        s = load_settings(REPO / "config" / name, environ={})
        for key in ("binary_classifier", "multiclass_classifier", "segmentation"):
            assert {"task", "architecture"} <= set(s.models[key]), (name, key)
            assert "model_type" not in s.models[key]
        configs = classifier_configs(s)
        assert configs["binary_classifier"].task == "binary_classification"
        assert configs["binary_classifier"].model_type == "swin_transformer"
        assert configs["multiclass_classifier"].task == "multilabel_classification"
        assert [c.name for c in segmentation_configs(s)] == ["segmentation"]


def test_legacy_names_keep_their_defaults_and_model_type_still_reads_as_architecture():
    s = make_settings(models={"binary_classifier": {"model_type": "densenet121"}, "multiclass_classifier": {}})
    configs = classifier_configs(s)
    assert configs["binary_classifier"].task == "binary_classification"
    assert configs["binary_classifier"].architecture == "densenet121"  # model_type: the deprecated spelling
    assert configs["multiclass_classifier"].task == "multilabel_classification"
    assert configs["multiclass_classifier"].architecture == "densenet121"


@pytest.mark.parametrize(
    ("entry", "field", "why"),
    [
        ({"task": "classify", "architecture": "densenet121"}, "models.x.task", "unknown task 'classify'"),
        ({"architecture": "densenet121", "labels": ["a"]}, "models.x.task", "is missing"),
        ({"checkpoint_path": "x.pt"}, "models.x.task", "is missing"),
        ({"task": "binary_classification"}, "models.x.architecture", "is missing"),
        ({"task": "segmentation", "classes": ["heart"]}, "models.x.architecture", "is missing"),
        ({"task": "binary_classification", "architecture": "resnet50"}, "models.x.architecture", "Input should be"),
        (
            {"task": "binary_classification", "architecture": "densenet121", "model_type": "densenet121"},
            "models.x",
            "set `architecture` only",
        ),
        ({"task": "segmentation", "architecture": "NotANet"}, "models.x.architecture", "unknown smp architecture"),
        (
            {"task": "multilabel_classification", "architecture": "densenet121", "num_classes": 3},
            "models.x",
            "set `labels`",
        ),
    ],
)
def test_a_bad_entry_is_a_config_error_naming_the_field(entry, field, why):
    s = make_settings(models={"binary_classifier": {"allow_untrained": True}, "x": entry})
    by_task = {"segmentation": [segmentation_configs], "binary_classification": [classifier_configs]}
    by_task["multilabel_classification"] = [classifier_configs]
    # a known task: the service of that task validates the entry; a missing or unknown one: every service refuses
    for load in by_task.get(entry.get("task"), [classifier_configs, segmentation_configs]):
        with pytest.raises(ConfigError) as err:
            load(s)
        assert field in str(err.value) and why in str(err.value), str(err.value)


def test_two_segmenters_cannot_share_a_name():
    s = make_settings(
        models={"segmentation": {}, "lungs": {"task": "segmentation", "architecture": "Unet", "name": "segmentation"}}
    )
    with pytest.raises(ConfigError, match=r"models\.\*\.name: two segmentation models are named \['segmentation'\]"):
        segmentation_configs(s)


@pytest.mark.parametrize(
    "entry",
    [
        {"archtecture": "densenet121", "labels": ["Effusion"]},  # a mistyped key: no task, no known model key
        {"type": "binary_classification", "architecture_": "densenet121"},  # `task` mistyped as `type`
        {},
    ],
)
def test_an_entry_without_a_task_that_is_no_service_section_is_refused(entry):
    s = make_settings(models={"binary_classifier": {"allow_untrained": True}, "screen": entry})
    for load in (classifier_configs, segmentation_configs):
        with pytest.raises(ConfigError, match=r"models\.screen\.task is missing.*\['classification', 'dicom', 'rag'"):
            load(s)


def test_a_catalog_service_name_is_its_own_section_and_nothing_else_is():
    s = make_settings(models={"rag": {"collection": "c"}, "classification": {"anything": 1}, "lungs": SCREEN})
    assert model_tasks(s, ("binary_classification", "segmentation")) == {"lungs": "binary_classification"}
    # a service's section that declares a model key is a model without a task, not a section
    s = make_settings(models={"rag": {"checkpoint_path": "x.pt"}})
    with pytest.raises(ConfigError, match=r"models\.rag\.task is missing"):
        model_tasks(s, ("segmentation",))


def test_an_extra_catalog_service_claims_its_own_models_section():
    catalog = REPO / "tests" / "support" / "brightness_catalog.json"
    s = make_settings(models={"brightness": {"gain": 2}}, service_catalog=[str(catalog)])
    assert model_tasks(s, ("segmentation",)) == {}
    with pytest.raises(ConfigError, match=r"models\.brightness\.task is missing"):
        model_tasks(make_settings(models={"brightness": {"gain": 2}}), ("segmentation",))


@pytest.mark.parametrize("typo", ["clasification", "brightness"])
def test_a_services_entry_outside_the_catalog_is_a_config_error_naming_it(tmp_path, typo):
    # "brightness" is a service only with its extra catalog file (tests/integration/test_service_catalog.py)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"services": {typo: {"port": 50071}}}))
    with pytest.raises(ConfigError, match=rf"services\.{typo}: no such service in the service catalog"):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("segmentation", "binary_classification"),
        ("binary_classifier", "segmentation"),
        ("multiclass_classifier", "binary_classification"),
    ],
)
def test_a_legacy_name_cannot_declare_another_task(name, task):
    s = make_settings(models={name: {"task": task, "architecture": "densenet121"}})
    for load in (classifier_configs, segmentation_configs):
        with pytest.raises(ConfigError, match=rf"models\.{name}\.task: '{task}' contradicts the legacy name"):
            load(s)


def test_a_service_with_no_model_of_its_task_refuses_to_start():
    from cxr_classification.service import build_binding as classification_binding
    from cxr_segmentation.service import build_binding as segmentation_binding

    only_classifiers = make_settings(models={"binary_classifier": {"allow_untrained": True}})
    with pytest.raises(ConfigError, match=r"models: declare at least one segmentation model"):
        segmentation_binding(only_classifiers)
    only_segmenter = make_settings(models={"segmentation": {"allow_untrained": True}})
    with pytest.raises(ConfigError, match=r"models: declare at least one classifier"):
        classification_binding(only_segmenter)
