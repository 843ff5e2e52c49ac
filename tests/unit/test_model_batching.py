"""A model entry's own `max_batch_size` / `max_batch_delay_ms` reach both its batcher and its warm-up sizes,
the same way for classifiers and segmenters (the server's values otherwise)."""

from cxr_classification.service import build_binding as classification_binding
from cxr_segmentation.service import build_binding as segmentation_binding
from tests.support.servers import make_settings

SMALL_CLASSIFIER = {"architecture": "densenet121", "allow_untrained": True, "input_size": 64}
SMALL_SEGMENTER = {"allow_untrained": True, "encoder": "resnet18", "input_size": 64}


def test_a_classifier_batches_and_warms_up_with_its_own_limits():
    s = make_settings(
        models={
            "binary_classifier": {**SMALL_CLASSIFIER, "task": "binary_classification"},
            "screen": {
                **SMALL_CLASSIFIER,
                "task": "binary_classification",
                "max_batch_size": 2,
                "max_batch_delay_ms": 0,
            },
        },
        server_config__max_batch_size=8,
        server_config__max_batch_delay_ms=5,
    )
    b = classification_binding(s)
    batching = b.repository._model_batching
    assert (batching["screen"].max_batch_size, batching["screen"].max_batch_delay_ms) == (2, 0)
    assert (batching["binary_classifier"].max_batch_size, batching["binary_classifier"].max_batch_delay_ms) == (8, 5)
    models = b.extra["models"]
    assert models["screen"]._max_batch_size == 2  # warm-up (and CUDA graph) batch sizes stop at the model's limit
    assert models["binary_classifier"]._max_batch_size == 8


def test_a_segmenter_warms_up_with_its_own_batch_limit():
    s = make_settings(
        models={
            "segmentation": SMALL_SEGMENTER,
            "lungs": {**SMALL_SEGMENTER, "task": "segmentation", "architecture": "FPN", "max_batch_size": 3},
        },
        server_config__max_batch_size=8,
    )
    b = segmentation_binding(s)
    assert b.repository._model_batching["lungs"].max_batch_size == 3
    assert b.repository.model("lungs")._max_batch_size == 3
    assert b.repository.model("segmentation")._max_batch_size == 8
