"""Which `models.<name>` entries each service serves: every entry declares its `task`, and a service
serves all the entries of its tasks, so a new model is a config entry, never a code edit.

An entry without `task` is a model only under one of the legacy names (`binary_classifier`,
`multiclass_classifier`, `segmentation`), which keep their documented defaults and cannot declare another
task; an entry named after a catalog service (`models.rag`) is that service's own section; any other
entry without `task` is refused, so a mistyped key never leaves a model silently unserved.
"""

from __future__ import annotations

from typing import Final

from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings

BINARY_CLASSIFICATION: Final = "binary_classification"
MULTILABEL_CLASSIFICATION: Final = "multilabel_classification"
SEGMENTATION: Final = "segmentation"
CLASSIFICATION_TASKS: Final = (BINARY_CLASSIFICATION, MULTILABEL_CLASSIFICATION)
SEGMENTATION_TASKS: Final = (SEGMENTATION,)
TASKS: Final = (*CLASSIFICATION_TASKS, *SEGMENTATION_TASKS)

# The names of the original configs: their task (and, in each service's schema, their architecture) default.
LEGACY_TASKS: Final[dict[str, str]] = {
    "binary_classifier": BINARY_CLASSIFICATION,
    "multiclass_classifier": MULTILABEL_CLASSIFICATION,
    "segmentation": SEGMENTATION,
}
ARCHITECTURE_KEYS: Final = ("architecture", "model_type")  # model_type: deprecated spelling of architecture
_MODEL_KEYS: Final = (*ARCHITECTURE_KEYS, "checkpoint_path")


def model_tasks(settings: Settings, tasks: tuple[str, ...]) -> dict[str, str]:
    """`{name: task}` of the `models.*` entries whose task is one of `tasks`, in config order.

    Raises ConfigError naming the field: `models.<name>.task` when it is missing from a model entry
    or unknown, `models.<name>.architecture` when an entry outside the legacy names omits it."""
    found: dict[str, str] = {}
    sections: set[str] | None = None  # the catalog's service names, read only when an entry has no task
    for name, raw in settings.models.items():
        legacy = LEGACY_TASKS.get(name)
        task = raw.get("task", legacy)
        if task is None:
            if sections is None:
                sections = set(settings.catalog())
            if name in sections and not any(key in raw for key in _MODEL_KEYS):
                continue  # the service's own section, e.g. models.rag
            raise ConfigError(
                f"models.{name}.task is missing: a model entry says what it does, one of {list(TASKS)} "
                f"(an entry without a task is only a service's own section: {sorted(sections)})"
            )
        if legacy is not None and task != legacy:
            raise ConfigError(
                f"models.{name}.task: {task!r} contradicts the legacy name {name!r}, which is a {legacy} "
                "model; give this model another name"
            )
        if task not in TASKS:
            raise ConfigError(f"models.{name}.task: unknown task {task!r}; known tasks: {list(TASKS)}")
        if name not in LEGACY_TASKS and not any(key in raw for key in ARCHITECTURE_KEYS):
            raise ConfigError(
                f"models.{name}.architecture is missing: name the network of this {task} model "
                "(e.g. densenet121, swin_transformer, timm, or an smp architecture such as Unet)"
            )
        if task in tasks:
            found[name] = str(task)
    return found
