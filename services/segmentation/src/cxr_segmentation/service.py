"""Wire the segmentation service into the shared runtime: every segmentation entry of `models.*` -> binding."""

from __future__ import annotations

import functools

from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.servicer import SegmentationServicer
from cxr_serving.binding import ModelEntry, bind_models
from cxr_serving.device import InferenceDevice
from cxr_serving.errors import ConfigError
from cxr_serving.lifecycle import BatchingConfig
from cxr_serving.model_tasks import SEGMENTATION_TASKS, model_tasks
from cxr_serving.runtimes.config import resolve_runtime
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
SECTION = "segmentation"


def segmentation_configs(settings: Settings) -> list[SegmentationConfig]:
    """Every `models.*` entry with task segmentation, validated (ConfigError names the field), each named
    by its key unless it sets `name`; none is a ConfigError, as a service with nothing to serve must not start."""
    configs: list[SegmentationConfig] = []
    for key in model_tasks(settings, SEGMENTATION_TASKS):
        cfg = settings.model_section(key, SegmentationConfig)
        if cfg is None:
            continue
        if "name" not in cfg.model_fields_set:
            cfg = cfg.model_copy(update={"name": key})
        configs.append(cfg)
    names = [cfg.name for cfg in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models.*.name: two segmentation models are named {duplicates}; names must be unique")
    if not configs:
        raise ConfigError(
            f"models: declare at least one segmentation model for the segmentation service: an entry with task "
            f"{' or '.join(SEGMENTATION_TASKS)} (e.g. models.{SECTION})"
        )
    return configs


def segmentation_config(settings: Settings) -> SegmentationConfig:
    """The default segmentation model's config (the first entry): what a request without model_name gets."""
    return segmentation_configs(settings)[0]


def build_model(settings: Settings, cfg: SegmentationConfig | None = None) -> SegmentationModel:
    cfg = cfg or segmentation_config(settings)
    device = InferenceDevice.resolve(settings.server_config.device, settings.performance)
    return SegmentationModel(
        cfg,
        device,
        default_checkpoint=settings.resolve_model_path(cfg.checkpoint_path),
        warmup_batches=settings.performance.warmup_batches,
        max_batch_size=cfg.max_batch_size or settings.server_config.max_batch_size,  # warm-up / graph sizes
        runtime=resolve_runtime(cfg.runtime, settings.data_path),
    )


def build_binding(settings: Settings) -> ServiceBinding:
    configs = segmentation_configs(settings)
    batching = {
        cfg.name: BatchingConfig.from_settings(
            settings.server_config, max_batch_size=cfg.max_batch_size, max_batch_delay_ms=cfg.max_batch_delay_ms
        )
        for cfg in configs
    }
    # In instance processes (model_instance_mode: process) each one builds its model with build_model.
    entries = [
        ModelEntry(
            build_model(settings, cfg),
            required=cfg.enabled,
            factory=functools.partial(build_model, settings, cfg),
            batching=batching[cfg.name],
        )
        for cfg in configs
    ]
    default = configs[0]
    return bind_models(
        settings,
        name=SECTION,
        full_service_names=[SERVICE_NAME],
        models=entries,
        servicer=lambda repo, pool: SegmentationServicer(settings, repo, pool, default_model=default.name),
        register=pb_grpc.add_SegmentationServiceServicer_to_server,
        extra={"config": default, "batching": batching[default.name], "configs": configs},
    )
