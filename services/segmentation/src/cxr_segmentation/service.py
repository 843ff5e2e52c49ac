"""Wire the segmentation service into the shared runtime: config -> model -> repository -> binding."""

from __future__ import annotations

import functools

from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from cxr_segmentation.config import SegmentationConfig
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.servicer import SegmentationServicer
from cxr_serving.device import InferenceDevice
from cxr_serving.images import DecodePool
from cxr_serving.lifecycle import BatchingConfig, ModelRepository
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
SECTION = "segmentation"


def segmentation_config(settings: Settings) -> SegmentationConfig:
    """`models.segmentation`, validated (ConfigError names the field); defaults when absent."""
    return settings.model_section(SECTION, SegmentationConfig) or SegmentationConfig()  # type: ignore[call-arg]


def build_model(settings: Settings, cfg: SegmentationConfig | None = None) -> SegmentationModel:
    cfg = cfg or segmentation_config(settings)
    device = InferenceDevice.resolve(settings.server_config.device, settings.performance)
    return SegmentationModel(
        cfg,
        device,
        default_checkpoint=settings.resolve_model_path(cfg.checkpoint_path),
        warmup_batches=settings.performance.warmup_batches,
        max_batch_size=settings.server_config.max_batch_size,
    )


def build_binding(settings: Settings) -> ServiceBinding:
    cfg = segmentation_config(settings)
    batching = BatchingConfig.from_settings(
        settings.server_config, max_batch_size=cfg.max_batch_size, max_batch_delay_ms=cfg.max_batch_delay_ms
    )
    repo = ModelRepository(batching)
    # In instance processes (model_instance_mode: process) each one builds the model with build_model.
    repo.add(build_model(settings, cfg), required=cfg.enabled, factory=functools.partial(build_model, settings, cfg))
    pool = DecodePool.from_settings(settings)
    servicer = SegmentationServicer(settings, repo, pool, default_model=cfg.name)

    async def stop() -> None:
        pool.close()

    return ServiceBinding(
        name=SECTION,
        full_service_names=[SERVICE_NAME],
        register=lambda server: pb_grpc.add_SegmentationServiceServicer_to_server(servicer, server),
        repository=repo,
        on_stop=stop,
        extra={"servicer": servicer, "config": cfg, "batching": batching},
    )
