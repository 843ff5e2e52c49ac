"""Typed clients of the three cxr services: `AsyncCxrClient` (grpc.aio) and `CxrClient` (blocking).

Both take a `ClientConfig` (default: `ClientConfig.from_env()`), open one channel per distinct
endpoint (so a gateway endpoint carries every service on one connection), send the API key as
`x-api-key` (the admin key instead, and only, on LoadModel, UnloadModel, IngestDocuments and
RetryDeadLetter), put a
deadline on every call, apply the published retry policy
(`cxr_client.retry_policy`) and raise `cxr_client.errors.CxrClientError` subclasses instead of
`grpc.RpcError`. Responses are the generated protobuf messages (`cxr_protos`), fully typed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_client.config import ClientConfig, ServiceName
from cxr_client.errors import AdminKeyNotConfiguredError, CxrClientError, from_rpc_error
from cxr_client.images import ImageInput, to_image
from cxr_client.retry_policy import channel_options, retried_grpc_services
from cxr_protos.classification.v1 import classification_service_pb2 as admin_pb
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_protos.dicom.v1 import dicom_service_pb2 as dicom_pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as dicom_grpc
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rag_grpc
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc

T = TypeVar("T")

MaskEncoding = Literal["png", "rle", "none"]
Priority = Literal["routine", "stat"]
RetrievalMode = Literal["hybrid", "dense", "lexical"]

_MASK_ENCODINGS = {
    "png": seg_pb.MASK_ENCODING_PNG,
    "rle": seg_pb.MASK_ENCODING_RLE,
    "none": seg_pb.MASK_ENCODING_NONE,
}
_PRIORITIES: dict[str, common_pb2.Priority] = {"routine": common_pb2.PRIORITY_ROUTINE, "stat": common_pb2.PRIORITY_STAT}
_RETRIEVAL_MODES = {
    "hybrid": rag_pb.RETRIEVAL_MODE_HYBRID,
    "dense": rag_pb.RETRIEVAL_MODE_DENSE,
    "lexical": rag_pb.RETRIEVAL_MODE_LEXICAL,
}
_HEALTH_NAMES = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
}


def _read(path: Any) -> bytes | None:
    return None if path is None else path.expanduser().read_bytes()


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    tls = config.tls
    if (tls.client_cert_file is None) != (tls.client_key_file is None):
        raise ValueError("mutual TLS needs both client_cert_file and client_key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.root_certs_file),
        private_key=_read(tls.client_key_file),
        certificate_chain=_read(tls.client_cert_file),
    )


def _options(config: ClientConfig) -> list[tuple[str, Any]]:
    grpc_services = retried_grpc_services(config.services.values())
    options = channel_options(config.max_message_mb, retries=config.retries, grpc_services=grpc_services)
    if config.tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name_override))
    return options


class ModelAdminStub:
    """The model-admin RPCs (ListModels/LoadModel/UnloadModel/GetModelCard/RecordModelEvaluation) of any
    catalog service with `model_admin`, at `/<grpc_service>/<Method>`: every cxr service declares them with the
    same messages on the wire (cxr_serving.model_admin serves them all), so classification's messages stand for all."""

    def __init__(self, channel: grpc.aio.Channel, grpc_service: str) -> None:
        def method(name: str, request: Any, response: Any) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
            return channel.unary_unary(
                f"/{grpc_service}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self.ListModels = method("ListModels", admin_pb.ListModelsRequest, admin_pb.ListModelsResponse)
        self.LoadModel = method("LoadModel", admin_pb.LoadModelRequest, admin_pb.LoadModelResponse)
        self.UnloadModel = method("UnloadModel", admin_pb.UnloadModelRequest, admin_pb.UnloadModelResponse)
        self.GetModelCard = method("GetModelCard", admin_pb.GetModelCardRequest, admin_pb.GetModelCardResponse)
        self.RecordModelEvaluation = method(
            "RecordModelEvaluation", admin_pb.RecordModelEvaluationRequest, admin_pb.RecordModelEvaluationResponse
        )
        self.PromoteModel = method("PromoteModel", admin_pb.PromoteModelRequest, admin_pb.PromoteModelResponse)
        self.RollbackModel = method("RollbackModel", admin_pb.RollbackModelRequest, admin_pb.RollbackModelResponse)
        self.SetModelRouting = method(
            "SetModelRouting", admin_pb.SetModelRoutingRequest, admin_pb.SetModelRoutingResponse
        )


def _priority(name: str) -> common_pb2.Priority:
    try:
        return _PRIORITIES[name]
    except KeyError:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, not {name!r}") from None


def _unhealthy(err: CxrClientError) -> str:
    if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "UNREACHABLE"
    return err.code.name


class AsyncCxrClient:
    """Async client of classification, segmentation and rag. Use `async with AsyncCxrClient() as c:`."""

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        self.config = config or ClientConfig.from_env(**overrides)
        if config is not None and overrides:
            self.config = config.model_copy(update=overrides)
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}

    # -- plumbing -------------------------------------------------------------------------------
    def channel(self, service: ServiceName) -> grpc.aio.Channel:
        key = self.config.target_for(service)
        if key not in self._channels:
            target, tls = key
            options = _options(self.config)
            self._channels[key] = (
                grpc.aio.secure_channel(target, channel_credentials(self.config), options=options)
                if tls
                else grpc.aio.insecure_channel(target, options=options)
            )
        return self._channels[key]

    def metadata(
        self, extra: Mapping[str, str] | None = None, *, admin_method: str | None = None
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata: the inference key, or for an admin call (`admin_method`) the admin key alone."""
        md: list[tuple[str, str]] = []
        if admin_method is not None:
            if not self.config.admin_api_key:
                raise AdminKeyNotConfiguredError(admin_method)
            md.append(("x-api-key", self.config.admin_api_key))
        elif self.config.api_key:
            md.append(("x-api-key", self.config.api_key))
        md.extend((extra or {}).items())
        return tuple(md)

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float | None,
        *,
        admin_method: str | None = None,
    ) -> T:
        metadata = self.metadata(admin_method=admin_method)
        try:
            return await method(
                request, metadata=metadata, timeout=timeout if timeout is not None else self.config.timeout_s
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _classification(self) -> cls_grpc.ClassificationServiceStub:
        return cls_grpc.ClassificationServiceStub(self.channel("classification"))

    def _segmentation(self) -> seg_grpc.SegmentationServiceStub:
        return seg_grpc.SegmentationServiceStub(self.channel("segmentation"))

    def _rag(self) -> rag_grpc.RagServiceStub:
        return rag_grpc.RagServiceStub(self.channel("rag"))

    def _dicom(self) -> dicom_grpc.DicomServiceStub:
        return dicom_grpc.DicomServiceStub(self.channel("dicom"))

    def _model_stub(self, service: ServiceName) -> ModelAdminStub:
        entry = self.config.services.get(service)
        if entry is None or not entry.model_admin:
            admin = sorted(n for n, e in self.config.services.items() if e.model_admin)
            raise ValueError(f"service {service!r} has no models to manage; the catalog's model services: {admin}")
        return ModelAdminStub(self.channel(service), entry.grpc_services[0])

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(grace=None)

    async def __aenter__(self) -> AsyncCxrClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- classification -------------------------------------------------------------------------
    async def classify(
        self,
        image: ImageInput,
        *,
        model_names: Sequence[str] = (),
        heatmap_labels: Sequence[str] = (),
        priority: Priority = "routine",
        timeout: float | None = None,
    ) -> cls_pb.ClassifyImageResponse:
        """Classify one image with every ready model, or with `model_names`. A "stat" request is served
        before routine ones; the call's deadline (`timeout`) also bounds its wait in the server's queue."""
        req = cls_pb.ClassifyImageRequest(
            image=to_image(image),
            model_names=list(model_names),
            heatmap_labels=list(heatmap_labels),
            priority=_priority(priority),
        )
        return await self._call(self._classification().ClassifyImage, req, timeout)

    async def classify_images(
        self,
        images: Iterable[ImageInput],
        *,
        model_names: Sequence[str] = (),
        priority: Priority = "routine",
        timeout: float | None = None,
    ) -> cls_pb.ClassifyImagesResponse:
        """Several images in one call; each result has either predictions or an `error` status."""
        req = cls_pb.ClassifyImagesRequest(
            images=[to_image(i) for i in images], model_names=list(model_names), priority=_priority(priority)
        )
        return await self._call(self._classification().ClassifyImages, req, timeout)

    async def stream_classify_images(
        self,
        images: Iterable[ImageInput],
        *,
        model_names: Sequence[str] = (),
        heatmap_labels: Sequence[str] = (),
        priority: Priority = "routine",
        timeout: float | None = None,
    ) -> AsyncIterator[cls_pb.StreamClassifyImagesResponse]:
        """Like classify_images, but each image's result arrives as soon as it is ready (use `.result.index`)."""
        req = cls_pb.StreamClassifyImagesRequest(
            images=[to_image(i) for i in images],
            model_names=list(model_names),
            heatmap_labels=list(heatmap_labels),
            priority=_priority(priority),
        )
        call = self._classification().StreamClassifyImages(
            req, metadata=self.metadata(), timeout=timeout if timeout is not None else self.config.timeout_s
        )
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # -- segmentation ---------------------------------------------------------------------------
    async def segment(
        self,
        image: ImageInput,
        *,
        model_name: str = "",
        classes: Sequence[str] = (),
        threshold: float = 0.0,
        mask_encoding: MaskEncoding = "png",
        include_overlay: bool = False,
        include_dicom_seg: bool = False,
        priority: Priority = "routine",
        timeout: float | None = None,
    ) -> seg_pb.SegmentImageResponse:
        """Anatomy masks and measurements (cardiothoracic ratio) of one image; `priority` as in `classify`."""
        req = seg_pb.SegmentImageRequest(
            image=to_image(image),
            model_name=model_name,
            classes=list(classes),
            threshold=threshold,
            mask_encoding=_MASK_ENCODINGS[mask_encoding],
            include_overlay=include_overlay,
            include_dicom_seg=include_dicom_seg,
            priority=_priority(priority),
        )
        return await self._call(self._segmentation().SegmentImage, req, timeout)

    # -- rag ------------------------------------------------------------------------------------
    async def search_literature(
        self,
        query: str,
        *,
        top_k: int = 0,
        filters: Mapping[str, str] | None = None,
        mode: RetrievalMode = "hybrid",
        timeout: float | None = None,
    ) -> rag_pb.SearchLiteratureResponse:
        """Passages from the literature store, without the LLM."""
        req = rag_pb.SearchLiteratureRequest(
            query=query, top_k=top_k, filters=dict(filters or {}), mode=_RETRIEVAL_MODES[mode]
        )
        return await self._call(self._rag().SearchLiterature, req, timeout)

    async def answer_question(
        self,
        question: str,
        *,
        top_k: int = 0,
        filters: Mapping[str, str] | None = None,
        mode: RetrievalMode = "hybrid",
        max_tokens: int = 0,
        temperature: float = 0.0,
        include_reasoning: bool = False,
        timeout: float | None = None,
    ) -> rag_pb.AnswerQuestionResponse:
        """An answer grounded in retrieved passages, with [n] citations."""
        req = rag_pb.AnswerQuestionRequest(
            question=question,
            top_k=top_k,
            filters=dict(filters or {}),
            mode=_RETRIEVAL_MODES[mode],
            max_tokens=max_tokens,
            temperature=temperature,
            include_reasoning=include_reasoning,
        )
        return await self._call(self._rag().AnswerQuestion, req, timeout)

    async def stream_answer(
        self,
        question: str,
        *,
        top_k: int = 0,
        filters: Mapping[str, str] | None = None,
        mode: RetrievalMode = "hybrid",
        max_tokens: int = 0,
        temperature: float = 0.0,
        timeout: float | None = None,
    ) -> AsyncIterator[rag_pb.StreamAnswerResponse]:
        """The answer as a stream: passages first, then text deltas, then citations."""
        req = rag_pb.StreamAnswerRequest(
            question=question,
            top_k=top_k,
            filters=dict(filters or {}),
            mode=_RETRIEVAL_MODES[mode],
            max_tokens=max_tokens,
            temperature=temperature,
        )
        call = self._rag().StreamAnswer(
            req, metadata=self.metadata(), timeout=timeout if timeout is not None else self.config.timeout_s
        )
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def ingest_documents(
        self, documents: Iterable[rag_pb.Document | Mapping[str, Any]], *, timeout: float | None = None
    ) -> rag_pb.IngestDocumentsResponse:
        docs = [d if isinstance(d, rag_pb.Document) else rag_pb.Document(**d) for d in documents]
        return await self._call(
            self._rag().IngestDocuments,
            rag_pb.IngestDocumentsRequest(documents=docs),
            timeout,
            admin_method="IngestDocuments",
        )

    # -- models ---------------------------------------------------------------------------------
    async def list_models(self, service: ServiceName, *, timeout: float | None = None) -> list[common_pb2.ModelInfo]:
        stub = self._model_stub(service)
        return list((await self._call(stub.ListModels, admin_pb.ListModelsRequest(), timeout)).models)

    async def load_model(
        self,
        service: ServiceName,
        model_name: str,
        *,
        checkpoint_path: str = "",
        thresholds: Mapping[str, float] | None = None,
        thresholds_model_version: str = "",
        side_by_side: bool = False,
        timeout: float | None = None,
    ) -> common_pb2.ModelInfo:
        """Load (or reload) a model; `thresholds` (by label, for the model version
        `thresholds_model_version`) replace the configured ones for this load; `side_by_side` loads the new
        version beside the serving one, which keeps serving."""
        stub = self._model_stub(service)
        req = admin_pb.LoadModelRequest(
            model_name=model_name,
            checkpoint_path=checkpoint_path,
            thresholds=dict(thresholds or {}),
            thresholds_model_version=thresholds_model_version,
            side_by_side=side_by_side,
        )
        info: common_pb2.ModelInfo = (await self._call(stub.LoadModel, req, timeout, admin_method="LoadModel")).model
        return info

    async def unload_model(
        self, service: ServiceName, model_name: str, *, timeout: float | None = None
    ) -> common_pb2.ModelInfo:
        stub = self._model_stub(service)
        req = admin_pb.UnloadModelRequest(model_name=model_name)
        info: common_pb2.ModelInfo = (
            await self._call(stub.UnloadModel, req, timeout, admin_method="UnloadModel")
        ).model
        return info

    async def promote_model(
        self, service: ServiceName, model_name: str, version: str = "", *, timeout: float | None = None
    ) -> common_pb2.ModelInfo:
        """Make a loaded version (default: the candidate) serve; the one it replaces stays loaded for a rollback."""
        req = admin_pb.PromoteModelRequest(model_name=model_name, version=version)
        stub = self._model_stub(service)
        info: common_pb2.ModelInfo = (
            await self._call(stub.PromoteModel, req, timeout, admin_method="PromoteModel")
        ).model
        return info

    async def rollback_model(
        self, service: ServiceName, model_name: str, *, timeout: float | None = None
    ) -> common_pb2.ModelInfo:
        """The previous serving version serves again (a pointer swap: nothing loads)."""
        req = admin_pb.RollbackModelRequest(model_name=model_name)
        stub = self._model_stub(service)
        info: common_pb2.ModelInfo = (
            await self._call(stub.RollbackModel, req, timeout, admin_method="RollbackModel")
        ).model
        return info

    async def set_model_routing(
        self,
        service: ServiceName,
        model_name: str,
        *,
        candidate_version: str = "",
        canary_percent: float = 0.0,
        shadow_percent: float = 0.0,
        version_policy: str = "",
        timeout: float | None = None,
    ) -> list[common_pb2.ModelInfo]:
        """Name the candidate version with its canary and shadow shares (percent); `version_policy`
        "latest" or "pinned" ("" leaves it). Every loaded version of the model, with its role."""
        policy = {"": 0, "latest": common_pb2.VERSION_POLICY_LATEST, "pinned": common_pb2.VERSION_POLICY_PINNED}
        req = admin_pb.SetModelRoutingRequest(
            model_name=model_name,
            candidate_version=candidate_version,
            canary_percent=canary_percent,
            shadow_percent=shadow_percent,
            version_policy=policy[version_policy],  # type: ignore[arg-type]
        )
        stub = self._model_stub(service)
        resp = await self._call(stub.SetModelRouting, req, timeout, admin_method="SetModelRouting")
        return list(resp.models)

    async def get_model_card(
        self, service: ServiceName, model_name: str, *, timeout: float | None = None
    ) -> common_pb2.ModelCard:
        """The card of the version of `model_name` that serves (its declaration, preprocessing, last evaluation)."""
        stub = self._model_stub(service)
        req = admin_pb.GetModelCardRequest(model_name=model_name)
        card: common_pb2.ModelCard = (await self._call(stub.GetModelCard, req, timeout)).card
        return card

    async def record_model_evaluation(
        self,
        service: ServiceName,
        model_name: str,
        evaluation: common_pb2.ModelEvaluation,
        *,
        timeout: float | None = None,
    ) -> common_pb2.ModelCard:
        """Record evaluation results on the card of `evaluation.model_version`, which must be the version
        serving (FAILED_PRECONDITION otherwise); the card as it is now."""
        stub = self._model_stub(service)
        req = admin_pb.RecordModelEvaluationRequest(model_name=model_name, evaluation=evaluation)
        card: common_pb2.ModelCard = (
            await self._call(stub.RecordModelEvaluation, req, timeout, admin_method="RecordModelEvaluation")
        ).card
        return card

    # -- dicom ----------------------------------------------------------------------------------
    async def study_status(
        self, study_instance_uid: str, *, timeout: float | None = None
    ) -> dicom_pb.GetStudyStatusResponse:
        """Where each accepted instance of a study is in the DICOM node's queue; NotFoundError for an unknown study."""
        req = dicom_pb.GetStudyStatusRequest(study_instance_uid=study_instance_uid)
        return await self._call(self._dicom().GetStudyStatus, req, timeout)

    async def list_dead_letters(
        self, study_instance_uid: str = "", *, timeout: float | None = None
    ) -> list[dicom_pb.InstanceStatus]:
        """Instances the DICOM node gave up on (max_attempts failures), with the last error; all studies by default."""
        req = dicom_pb.ListDeadLettersRequest(study_instance_uid=study_instance_uid)
        return list((await self._call(self._dicom().ListDeadLetters, req, timeout)).instances)

    async def retry_dead_letter(self, sop_instance_uid: str, *, timeout: float | None = None) -> bool:
        """Queue a dead-lettered instance again (admin key); False when it is not dead-lettered."""
        req = dicom_pb.RetryDeadLetterRequest(sop_instance_uid=sop_instance_uid)
        resp = await self._call(self._dicom().RetryDeadLetter, req, timeout, admin_method="RetryDeadLetter")
        return bool(resp.requeued)

    # -- health ---------------------------------------------------------------------------------
    async def health(self, service: ServiceName, *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status of one service: SERVING, NOT_SERVING, ... or UNREACHABLE.

        Through a gateway that does not route grpc.health.v1, a ListModels (any model ready), a
        one-passage SearchLiterature (rag) or a ListDeadLetters (dicom) stands in for the health check;
        for another service without model admin the answer is UNKNOWN."""
        stub = health_pb2_grpc.HealthStub(self.channel(service))
        try:
            resp = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout)
        except CxrClientError as err:
            if err.code is grpc.StatusCode.UNIMPLEMENTED:
                return await self._probe(service, timeout)
            return _unhealthy(err)
        return _HEALTH_NAMES.get(resp.status, str(resp.status))

    async def _probe(self, service: ServiceName, timeout: float | None) -> str:
        try:
            if service == "rag":
                await self.search_literature("chest radiograph", top_k=1, timeout=timeout)
                return "SERVING"
            if service == "dicom":
                await self.list_dead_letters(timeout=timeout)
                return "SERVING"
            entry = self.config.services.get(service)
            if entry is None or not entry.model_admin:
                return "UNKNOWN"  # no health route and no read-only RPC known to stand in for it
            models = await self.list_models(service, timeout=timeout)
        except CxrClientError as err:
            return _unhealthy(err)
        ready = [m for m in models if m.state == common_pb2.MODEL_STATE_READY]
        return "SERVING" if ready else "NOT_SERVING"

    async def health_all(self, *, timeout: float | None = 5.0) -> dict[str, str]:
        names = list(self.config.services)
        results = await asyncio.gather(*(self.health(s, timeout=timeout) for s in names))
        return dict(zip(names, results, strict=True))


class CxrClient:
    """Blocking client: the same API as `AsyncCxrClient`, run on a private event-loop thread.

    Safe to call from several threads at once; use as a context manager or call `close()`.
    """

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cxr-client", daemon=True)
        self._thread.start()
        self._async = AsyncCxrClient(config, **overrides)
        self.config = self._async.config

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> CxrClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def classify(self, image: ImageInput, **kwargs: Any) -> cls_pb.ClassifyImageResponse:
        return self._run(self._async.classify(image, **kwargs))

    def classify_images(self, images: Iterable[ImageInput], **kwargs: Any) -> cls_pb.ClassifyImagesResponse:
        return self._run(self._async.classify_images(list(images), **kwargs))

    def stream_classify_images(
        self, images: Iterable[ImageInput], **kwargs: Any
    ) -> list[cls_pb.StreamClassifyImagesResponse]:
        """All streamed results, in completion order."""

        async def collect() -> list[cls_pb.StreamClassifyImagesResponse]:
            return [m async for m in self._async.stream_classify_images(list(images), **kwargs)]

        return self._run(collect())

    def segment(self, image: ImageInput, **kwargs: Any) -> seg_pb.SegmentImageResponse:
        return self._run(self._async.segment(image, **kwargs))

    def search_literature(self, query: str, **kwargs: Any) -> rag_pb.SearchLiteratureResponse:
        return self._run(self._async.search_literature(query, **kwargs))

    def answer_question(self, question: str, **kwargs: Any) -> rag_pb.AnswerQuestionResponse:
        return self._run(self._async.answer_question(question, **kwargs))

    def stream_answer(self, question: str, **kwargs: Any) -> list[rag_pb.StreamAnswerResponse]:
        async def collect() -> list[rag_pb.StreamAnswerResponse]:
            return [m async for m in self._async.stream_answer(question, **kwargs)]

        return self._run(collect())

    def ingest_documents(self, documents: Iterable[Any], **kwargs: Any) -> rag_pb.IngestDocumentsResponse:
        return self._run(self._async.ingest_documents(list(documents), **kwargs))

    def list_models(self, service: ServiceName, **kwargs: Any) -> list[common_pb2.ModelInfo]:
        return self._run(self._async.list_models(service, **kwargs))

    def load_model(self, service: ServiceName, model_name: str, **kwargs: Any) -> common_pb2.ModelInfo:
        return self._run(self._async.load_model(service, model_name, **kwargs))

    def unload_model(self, service: ServiceName, model_name: str, **kwargs: Any) -> common_pb2.ModelInfo:
        return self._run(self._async.unload_model(service, model_name, **kwargs))

    def promote_model(self, service: ServiceName, model_name: str, version: str = "", **kwargs: Any) -> Any:
        return self._run(self._async.promote_model(service, model_name, version, **kwargs))

    def rollback_model(self, service: ServiceName, model_name: str, **kwargs: Any) -> common_pb2.ModelInfo:
        return self._run(self._async.rollback_model(service, model_name, **kwargs))

    def set_model_routing(self, service: ServiceName, model_name: str, **kwargs: Any) -> list[common_pb2.ModelInfo]:
        return self._run(self._async.set_model_routing(service, model_name, **kwargs))

    def get_model_card(self, service: ServiceName, model_name: str, **kwargs: Any) -> common_pb2.ModelCard:
        return self._run(self._async.get_model_card(service, model_name, **kwargs))

    def record_model_evaluation(
        self, service: ServiceName, model_name: str, evaluation: common_pb2.ModelEvaluation, **kwargs: Any
    ) -> common_pb2.ModelCard:
        return self._run(self._async.record_model_evaluation(service, model_name, evaluation, **kwargs))

    def study_status(self, study_instance_uid: str, **kwargs: Any) -> dicom_pb.GetStudyStatusResponse:
        return self._run(self._async.study_status(study_instance_uid, **kwargs))

    def list_dead_letters(self, study_instance_uid: str = "", **kwargs: Any) -> list[dicom_pb.InstanceStatus]:
        return self._run(self._async.list_dead_letters(study_instance_uid, **kwargs))

    def retry_dead_letter(self, sop_instance_uid: str, **kwargs: Any) -> bool:
        return self._run(self._async.retry_dead_letter(sop_instance_uid, **kwargs))

    def health(self, service: ServiceName, **kwargs: Any) -> str:
        return self._run(self._async.health(service, **kwargs))

    def health_all(self, **kwargs: Any) -> dict[str, str]:
        return self._run(self._async.health_all(**kwargs))
