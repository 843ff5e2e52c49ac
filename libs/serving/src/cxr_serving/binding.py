"""One way to plug a model-serving gRPC service into the shared server: models -> repository, a
decode pool, the servicer built on both, and the pool closed at stop (what every service repeated);
`infer` is the one-model request path that calls the model's preprocess/postprocess hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from cxr_serving.images import DecodedImage, DecodeLimits, DecodePool, decode_image
from cxr_serving.instances import ModelFactory
from cxr_serving.lifecycle import BatchingConfig, Dispatch, ModelRepository, ServedModel
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings
from cxr_serving.urgency import ROUTINE, Urgency

S = TypeVar("S")
RepositoryMaker = Callable[[BatchingConfig], ModelRepository]
_REPOSITORY_MAKER: ContextVar[RepositoryMaker | None] = ContextVar("cxr_repository_maker", default=None)


@contextlib.contextmanager
def repository_maker(make: RepositoryMaker) -> Iterator[None]:
    """Bindings built inside get their repository from `make` (a frontend process: frontend_repository.py),
    so a service's own `build_binding` serves in a frontend unchanged."""
    token = _REPOSITORY_MAKER.set(make)
    try:
        yield
    finally:
        _REPOSITORY_MAKER.reset(token)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the service: `required` ones gate readiness (disabled ones are listed and can be
    loaded on demand); `factory` builds it again in instance processes; `batching` overrides the
    server's batch size and delay for this model."""

    model: ServedModel
    required: bool = True
    factory: ModelFactory | None = None
    batching: BatchingConfig | None = None


def bind_models(
    settings: Settings,
    *,
    name: str,
    full_service_names: Sequence[str],
    models: Iterable[ModelEntry],
    servicer: Callable[[ModelRepository, DecodePool], S],
    register: Callable[[S, grpc.aio.Server], None],
    extra: dict[str, Any] | None = None,
) -> ServiceBinding:
    """The `ServiceBinding` of a service whose servicer needs only its repository and decode pool;
    `register` is the generated `add_<Service>Servicer_to_server`. `extra` carries the servicer too."""
    make = _REPOSITORY_MAKER.get() or ModelRepository
    repo = make(BatchingConfig.from_settings(settings.server_config))
    for entry in models:
        repo.add(entry.model, required=entry.required, factory=entry.factory, batching=entry.batching)
    pool = DecodePool.from_settings(settings)
    built = servicer(repo, pool)

    async def stop() -> None:
        pool.close()

    return ServiceBinding(
        name=name,
        full_service_names=list(full_service_names),
        register=lambda server: register(built, server),
        repository=repo,
        on_stop=stop,
        extra={"servicer": built, **(extra or {})},
    )


async def infer(
    repo: ModelRepository,
    pool: DecodePool,
    name: str,
    data: bytes,
    content_type: str,
    dispatch: Dispatch | None = None,
    options: Any = None,
    urgency: Urgency = ROUTINE,
) -> tuple[DecodedImage, Any]:
    """One image through one model: decode and the model's `preprocess` as one job on the decode pool,
    its batched `predict`, then its `postprocess(output, options)` on the pool; returns the decoded image
    and the postprocessed result. `dispatch` is the model's entry of `repo.expect`; `urgency` the request's
    priority and deadline."""
    model = repo.model(name)
    decoded, item = await pool.run(_decode_and_preprocess, data, content_type, pool.limits, model)
    output = await repo.predict(name, item, dispatch, urgency)
    return decoded, await pool.run(model.postprocess, output, options)


def _decode_and_preprocess(
    data: bytes, content_type: str, limits: DecodeLimits, model: ServedModel
) -> tuple[DecodedImage, Any]:
    decoded = decode_image(data, content_type, limits)
    return decoded, model.preprocess(decoded)
