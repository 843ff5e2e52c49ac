"""Wire the classification service into the shared runtime: every classifier entry of `models.*` -> binding."""

from __future__ import annotations

import functools

from cxr_classification.config import classifier_configs
from cxr_classification.model import ChestXrayClassifier
from cxr_classification.servicer import ClassificationServicer
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_serving.binding import ModelEntry, bind_models
from cxr_serving.device import InferenceDevice
from cxr_serving.lifecycle import BatchingConfig
from cxr_serving.runtimes.config import resolve_runtime
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClassificationService"].full_name


def build_models(settings: Settings, device: InferenceDevice) -> dict[str, ChestXrayClassifier]:
    return {
        name: ChestXrayClassifier(
            name,
            cfg,
            device,
            checkpoint_path=settings.resolve_model_path(cfg.checkpoint_path),
            warmup_batches=settings.performance.warmup_batches,
            max_batch_size=cfg.max_batch_size or settings.server_config.max_batch_size,  # warm-up sizes
            runtime=resolve_runtime(cfg.runtime, settings.data_path),
        )
        for name, cfg in classifier_configs(settings).items()
    }


def build_model(settings: Settings, name: str) -> ChestXrayClassifier:
    """One classifier, unloaded: what each instance process builds (model_instance_mode: process)."""
    device = InferenceDevice.resolve(settings.server_config.device, settings.performance)
    return build_models(settings, device)[name]


def build_binding(settings: Settings) -> ServiceBinding:
    """Every configured classifier, served; raises ConfigError for a bad `models.*` entry."""
    sc = settings.server_config
    device = InferenceDevice.resolve(sc.device, settings.performance)
    models = build_models(settings, device)
    entries = [  # disabled models are listed and can be loaded on demand
        ModelEntry(
            model,
            required=model.cfg.enabled,
            factory=functools.partial(build_model, settings, name),
            batching=BatchingConfig.from_settings(
                sc, max_batch_size=model.cfg.max_batch_size, max_batch_delay_ms=model.cfg.max_batch_delay_ms
            ),
        )
        for name, model in models.items()
    ]
    return bind_models(
        settings,
        name="classification",
        full_service_names=[SERVICE_NAME],
        models=entries,
        servicer=lambda repo, pool: ClassificationServicer(
            repo, models, pool, models_path=settings.models_path, max_in_flight_per_request=2 * sc.max_batch_size
        ),
        register=pb_grpc.add_ClassificationServiceServicer_to_server,
        extra={"models": models},
    )


def main() -> None:
    from cxr_serving.cli import run_service

    raise SystemExit(run_service("classification", build_binding))
