"""`models.binary_classifier` / `models.multiclass_classifier` validation and defaults."""

from __future__ import annotations

import pytest

from cxr_classification.config import (
    BINARY_MODEL,
    DEFAULT_SWIN,
    MULTILABEL_MODEL,
    NIH_LABELS,
    XRV_TARGETS,
    BinaryClassifierConfig,
    MultiLabelClassifierConfig,
    classifier_configs,
)
from cxr_classification.model import output_index
from cxr_serving.errors import ConfigError
from cxr_serving.settings import load_settings
from tests.support.paths import REPO
from tests.support.servers import make_settings


def test_local_config_gives_both_models_untrained_allowed():
    configs = classifier_configs(load_settings(REPO / "config" / "local.json", environ={}))
    binary, multi = configs[BINARY_MODEL], configs[MULTILABEL_MODEL]
    assert binary.architecture == DEFAULT_SWIN and binary.output_labels == ["abnormal"]
    assert binary.head_size == 1 and binary.activation == "sigmoid" and binary.allow_untrained
    assert multi.architecture == "densenet121" and multi.output_labels == list(NIH_LABELS)
    assert multi.normalization == "imagenet" and multi.in_chans == 3 and multi.input_size == 224


def test_nih_labels_are_in_the_nih_order():
    assert NIH_LABELS[:3] == ("Atelectasis", "Cardiomegaly", "Effusion") and NIH_LABELS[-1] == "Hernia"
    assert len(NIH_LABELS) == 14


def test_bad_field_names_the_field():
    s = make_settings(models={MULTILABEL_MODEL: {"model_type": "densenet121", "thresholds": 1.5}})
    with pytest.raises(ConfigError, match=r"models\.multiclass_classifier\.thresholds"):
        classifier_configs(s)
    s = make_settings(models={BINARY_MODEL: {"model_type": "swin_transformer", "input_sise": 224}})
    with pytest.raises(ConfigError, match=r"models\.binary_classifier\.input_sise: Extra inputs"):
        classifier_configs(s)
    s = make_settings(models={BINARY_MODEL: {"normalization": "zscore"}})
    with pytest.raises(ConfigError, match=r"models\.binary_classifier\.normalization"):
        classifier_configs(s)


def test_no_classifier_configured_is_a_config_error():
    with pytest.raises(ConfigError, match="binary_classifier"):
        classifier_configs(make_settings(models={"segmentation": {"enabled": True}}))


def test_xrv_format_selects_xrv_preprocessing_and_its_18_outputs():
    cfg = MultiLabelClassifierConfig(checkpoint_format="xrv")
    assert cfg.normalization == "xrv" and cfg.in_chans == 1
    assert cfg.head_size == 18 and cfg.checkpoint_labels == list(XRV_TARGETS)
    assert [XRV_TARGETS[i] for i in output_index(cfg)] == list(NIH_LABELS)
    with pytest.raises(ValueError, match="not outputs of the checkpoint"):
        MultiLabelClassifierConfig(checkpoint_format="xrv", labels=["Atelectasis", "COVID-19"])
    with pytest.raises(ValueError, match="needs model_type 'densenet121'"):
        BinaryClassifierConfig(checkpoint_format="xrv")


@pytest.mark.parametrize("thresholds", [0.0, -0.1, {"Effusion": 0.0}, {"Hernia": 1.01}])
def test_thresholds_must_be_above_0_and_at_most_1(thresholds):
    """A threshold of 0 makes its label positive on every image: refused like one above 1."""
    with pytest.raises(ValueError, match=r"thresholds must be within \(0, 1\]"):
        MultiLabelClassifierConfig(thresholds=thresholds)
    assert MultiLabelClassifierConfig(thresholds={"Effusion": 2**-20, "Hernia": 1.0}).threshold("Effusion") == 2**-20


def test_thresholds_per_label():
    cfg = MultiLabelClassifierConfig(thresholds={"Cardiomegaly": 0.3, "Hernia": 0.9})
    assert cfg.threshold("Cardiomegaly") == 0.3 and cfg.threshold("Hernia") == 0.9 and cfg.threshold("Mass") == 0.5
    with pytest.raises(ValueError, match="unknown labels"):
        MultiLabelClassifierConfig(thresholds={"Cardiomegally": 0.3})


def test_binary_heads():
    assert BinaryClassifierConfig(num_classes=2).activation == "softmax"
    assert output_index(BinaryClassifierConfig(num_classes=2)) == [1]
    assert output_index(BinaryClassifierConfig()) == [0]
    with pytest.raises(ValueError, match="num_classes must be 1"):
        BinaryClassifierConfig(num_classes=3)
    with pytest.raises(ValueError, match="timm_name is required"):
        BinaryClassifierConfig(model_type="timm")
    assert BinaryClassifierConfig(model_type="timm", timm_name="resnet18").architecture == "resnet18"


def test_custom_labels_must_match_num_classes():
    cfg = MultiLabelClassifierConfig(num_classes=2, labels=["Effusion", "Pneumothorax"])
    assert cfg.head_size == 2
    with pytest.raises(ValueError, match="set `labels`"):
        MultiLabelClassifierConfig(num_classes=5)
    with pytest.raises(ValueError, match="labels has 2 entries but num_classes is 3"):
        MultiLabelClassifierConfig(num_classes=3, labels=["a", "b"])
