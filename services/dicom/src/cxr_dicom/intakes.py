"""The two intakes: a pynetdicom C-STORE SCP and a STOW-RS route (`POST /dicom-web/studies`), both in front of
`Intake.receive`, so a sender learns "stored" only once the instance is on disk and queued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_dicom import metrics
from cxr_dicom.acceptance import Refusal, RefusalKind
from cxr_dicom.config import DicomConfig
from cxr_dicom.intake import Intake
from cxr_dicom.work_queue import QueueFullError
from cxr_serving.audit import key_fingerprint
from cxr_serving.auth import API_KEY_HEADERS, ApiKeyStore

log = logging.getLogger("cxr.dicom.intakes")

OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources": the sender retries later
DICOM_JSON = "application/dicom+json"


# -- DIMSE C-STORE SCP --------------------------------------------------------------------------------------
def start_scp(cfg: DicomConfig, intake: Intake, host: str) -> Any:
    """A C-STORE SCP on ``host``:``cfg.dimse_port`` (a ThreadedAssociationServer); the caller shuts it down.

    Every storage SOP class is negotiated, so an instance the node does not analyse gets a C-STORE status
    that says why (0x0122...) instead of a rejected presentation context."""
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = True
    if cfg.accepted_calling_ae_titles:
        ae.require_calling_aet = list(cfg.accepted_calling_ae_titles)
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def on_store(event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            intake.receive(
                event.encoded_dataset(),
                declared_sop_class=str(event.request.AffectedSOPClassUID),
                calling_ae=calling,
                peer=str(event.assoc.requestor.address),
            )
        except Refusal as refusal:
            metrics.refused("dimse", refusal.dimse_status)
            return refusal.dimse_status
        except QueueFullError:
            log.warning("queue full: C-STORE refused with 0xA700", extra={"fields": {"calling_ae": calling}})
            metrics.refused("dimse", OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES
        except OSError as exc:
            log.error("could not keep an instance: %s", type(exc).__name__, extra={"fields": {"calling_ae": calling}})
            metrics.refused("dimse", OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES
        metrics.accepted("dimse")
        return 0x0000

    return ae.start_server((host, cfg.dimse_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


# -- STOW-RS ------------------------------------------------------------------------------------------------
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_TYPE = re.compile(r'type="?([^";]+)"?', re.IGNORECASE)


def parse_multipart_related(body: bytes, content_type: str) -> Iterator[tuple[str, bytes]]:
    """(part content type, part bytes) of a multipart/related body; ValueError when it is not one."""
    media = content_type.split(";", 1)[0].strip().lower()
    match = _BOUNDARY.search(content_type)
    if media != "multipart/related" or match is None:
        raise ValueError("the body must be multipart/related with a boundary")
    root_type = _TYPE.search(content_type)
    default_type = root_type.group(1).strip().lower() if root_type else "application/dicom"
    delimiter = b"--" + match.group(1).encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ValueError("the multipart body has no part")
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, data = b"", chunk.removeprefix(b"\r\n")
        part_type = default_type
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.split(";", 1)[0].strip().lower()
        yield part_type, data.removesuffix(b"\r\n")


def _api_key(request: Request) -> str:
    key = next((request.headers[h] for h in API_KEY_HEADERS if h in request.headers), "")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def _referenced(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's event loop: the shared runtime, not uvicorn, owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StowServer:
    """`POST /dicom-web/studies` on ``host``:``cfg.stow_port``, behind the API key."""

    def __init__(self, cfg: DicomConfig, intake: Intake, keys: ApiKeyStore | None, host: str) -> None:
        self.cfg = cfg
        self.intake = intake
        self.keys = keys
        self.host = host
        self.port = 0
        routes = [
            Route("/dicom-web/studies", self.store, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.create_server((self.host, self.cfg.stow_port))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="stow-rs")
        for _ in range(500):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("STOW-RS on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)

    def _authorized(self, request: Request) -> bool:
        if self.keys is None:
            return True
        key = _api_key(request)
        return bool(key) and self.keys.is_valid(key)

    async def store(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": "a valid API key is required (x-api-key)"}, status_code=401)
        length = request.headers.get("content-length")
        limit = int(self.cfg.stow_max_request_mb * 1024 * 1024)
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"error": f"request larger than {self.cfg.stow_max_request_mb} MB"}, status_code=413)
        body = await request.body()
        if len(body) > limit:
            return JSONResponse({"error": f"request larger than {self.cfg.stow_max_request_mb} MB"}, status_code=413)
        try:
            parts = list(parse_multipart_related(body, request.headers.get("content-type", "")))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=415)
        stored: list[Dataset] = []
        failed: list[Dataset] = []
        key_id = key_fingerprint(_api_key(request)) or None
        peer = request.client.host if request.client is not None else ""
        for part_type, data in parts:
            if part_type != "application/dicom":
                refusal = Refusal(RefusalKind.CANNOT_UNDERSTAND, f"part of type {part_type}")
                metrics.refused("stow", refusal.stow_failure_reason)
                failed.append(refusal.failed_sop_item())
                continue
            try:
                received = await asyncio.to_thread(self.intake.receive, data, via="stow", api_key_id=key_id, peer=peer)
            except Refusal as refusal:
                metrics.refused("stow", refusal.stow_failure_reason)
                failed.append(refusal.failed_sop_item())
                continue
            except QueueFullError:
                log.warning("queue full: STOW-RS answered 503")
                metrics.refused("stow", "http_503")
                return Response(
                    status_code=503,
                    headers={"Retry-After": str(self.cfg.busy_retry_after_s)},
                    content=b"the work queue is full; retry later",
                )
            metrics.accepted("stow")
            accepted = received.accepted
            stored.append(_referenced(accepted.sop_class_uid, accepted.sop_instance_uid))
        answer = Dataset()
        if stored:
            answer.ReferencedSOPSequence = stored
        if failed:
            answer.FailedSOPSequence = failed
        status = 200 if not failed else (202 if stored else 409)
        return JSONResponse(answer.to_json_dict(), status_code=status, media_type=DICOM_JSON)
