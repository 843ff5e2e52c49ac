"""The two intakes: a pynetdicom C-STORE SCP and a STOW-RS route (`POST /dicom-web/studies`), both in front of
`Intake.receive`, so a sender learns "stored" only once the instance is on disk and queued."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import uvicorn
from pydicom import Dataset, dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_dicom import metrics
from cxr_dicom.acceptance import Refusal, RefusalKind
from cxr_dicom.config import DicomConfig
from cxr_dicom.intake import Intake
from cxr_dicom.multipart import Event, MultipartRelatedParser, PartData, PartStart, UnsupportedMediaType
from cxr_dicom.work_queue import QueueFullError
from cxr_serving.audit import key_fingerprint
from cxr_serving.auth import API_KEY_HEADERS, FORWARDED_FOR_HEADER, ApiKeyStore, client_ip

log = logging.getLogger("cxr.dicom.intakes")

OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources": the sender retries later
DICOM_JSON = "application/dicom+json"
# The largest P-DATA PDU the SCP takes: a radiograph arrives in a few PDUs instead of hundreds of 16 KB ones
# (pynetdicom's default), each of which costs the receive loop a turn in Python.
SCP_MAX_PDU_BYTES = 4 * 1024 * 1024


# -- DIMSE C-STORE SCP --------------------------------------------------------------------------------------
def start_scp(cfg: DicomConfig, intake: Intake, host: str) -> Any:
    """A C-STORE SCP on ``host``:``cfg.dimse_port`` (a ThreadedAssociationServer); the caller shuts it down.

    Every storage SOP class is negotiated, so an instance the node does not analyse gets a C-STORE status
    that says why (0xA900 and an Error Comment, acceptance.py) instead of a rejected presentation context."""
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = True
    ae.maximum_pdu_size = SCP_MAX_PDU_BYTES
    if cfg.accepted_calling_ae_titles:
        ae.require_calling_aet = list(cfg.accepted_calling_ae_titles)
    contexts = supported_contexts()
    ae.supported_contexts = contexts

    def on_store(event: Any) -> int | Dataset:
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
            return refusal.dimse_response()
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

    return ae.start_server(
        (host, cfg.dimse_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)], contexts=contexts
    )


class _KeptContext(PresentationContext):
    """A presentation context the SCP supports. pynetdicom deep-copies the SCP's contexts for every association
    (every storage class in every transfer syntax: thousands of UIDs, each re-validated when copied); the values
    are immutable UIDs, so the copy shares them and copies only the list."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _KeptContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class in every transfer syntax, and Verification (as `AE.add_supported_context` makes
    them), as `_KeptContext`s."""
    ae = AE()
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    kept: list[PresentationContext] = []
    for context in ae.supported_contexts:
        clone = _KeptContext()
        clone.__dict__.update(copy.deepcopy(context.__dict__))
        kept.append(clone)
    return kept


# -- STOW-RS ------------------------------------------------------------------------------------------------
STOW_SPOOL_DIR = "stow-spool"


def parse_multipart_related(body: bytes, content_type: str) -> Iterator[tuple[str, bytes]]:
    """(part content type, part bytes) of a whole multipart/related body; ValueError when it is not one."""
    parser = MultipartRelatedParser(content_type)
    part_type, data = "", bytearray()
    for event in [*parser.feed(body), *parser.close()]:
        if isinstance(event, PartStart):
            part_type, data = event.content_type, bytearray()
        elif isinstance(event, PartData):
            data += event.data
        else:
            yield part_type, bytes(data)


def _api_key(request: Request) -> str:
    key = next((request.headers[h] for h in API_KEY_HEADERS if h in request.headers), "")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def _out_of_resources(data: bytes) -> Dataset:
    """A FailedSOPSequence item with FailureReason 0xA700 and whatever UIDs the instance's header gives."""
    item = Dataset()
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        item.ReferencedSOPClassUID = str(ds.get("SOPClassUID", ""))
        item.ReferencedSOPInstanceUID = str(ds.get("SOPInstanceUID", ""))
    except Exception:  # an unreadable header: the item still says why the part was not stored
        item.ReferencedSOPClassUID = item.ReferencedSOPInstanceUID = ""
    item.FailureReason = OUT_OF_RESOURCES
    return item


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

    def __init__(
        self,
        cfg: DicomConfig,
        intake: Intake,
        keys: ApiKeyStore | None,
        host: str,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.intake = intake
        self.keys = keys
        self.host = host
        self.trusted_proxies = list(trusted_proxies)
        self.port = 0
        routes = [
            Route("/dicom-web/studies", self.store, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        shutil.rmtree(self.intake.data_path / STOW_SPOOL_DIR, ignore_errors=True)  # a stopped node's requests
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

    def _too_large(self) -> Response:
        return JSONResponse({"error": f"request larger than {self.cfg.stow_max_request_mb} MB"}, status_code=413)

    async def _spool(self, request: Request, parser: MultipartRelatedParser, spool: Path) -> list[tuple[str, Path]]:
        """Each part of the body written to its own file under ``spool`` as it is read, chunk by chunk; raises
        `_TooLarge` as soon as more than stow_max_request_mb arrived, ValueError for a malformed body."""
        limit = int(self.cfg.stow_max_request_mb * 1024 * 1024)
        spooler = _Spooler(spool)
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise _TooLarge
                if chunk:
                    await asyncio.to_thread(spooler.write, parser.feed(chunk))
            await asyncio.to_thread(spooler.write, parser.close())
        finally:
            spooler.close()
        return spooler.parts

    async def store(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": "a valid API key is required (x-api-key)"}, status_code=401)
        length = request.headers.get("content-length")
        limit = int(self.cfg.stow_max_request_mb * 1024 * 1024)
        if length is not None and length.isdigit() and int(length) > limit:
            return self._too_large()
        try:
            parser = MultipartRelatedParser(request.headers.get("content-type", ""))
        except UnsupportedMediaType as exc:
            return JSONResponse({"error": str(exc)}, status_code=415)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        spool: Path | None = None
        try:
            try:
                spool_root = self.intake.data_path / STOW_SPOOL_DIR
                spool_root.mkdir(parents=True, exist_ok=True)
                spool = Path(tempfile.mkdtemp(dir=spool_root, prefix="request-"))
                parts = await self._spool(request, parser, spool)
            except _TooLarge:
                return self._too_large()
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except OSError as exc:  # nothing was stored: the sender retries the whole request
                log.error("could not spool a STOW-RS request: %s", type(exc).__name__)
                metrics.refused("stow", "http_503")
                return self._busy(Dataset())
            return await self._store_parts(request, parts)
        finally:
            if spool is not None:
                await asyncio.to_thread(shutil.rmtree, spool, True)

    def _client(self, request: Request) -> str:
        """The sender's address for the audit trail: the peer, or behind a trusted gateway the client its
        X-Forwarded-For names (`cxr_serving.auth.client_ip`, as the gRPC allow-list reads it)."""
        host = request.client.host if request.client is not None else ""
        if not self.trusted_proxies:
            return host
        return client_ip(host, request.headers.getlist(FORWARDED_FOR_HEADER), self.trusted_proxies)

    def _busy(self, answer: Dataset) -> Response:
        return JSONResponse(
            answer.to_json_dict(),
            status_code=503,
            media_type=DICOM_JSON,
            headers={"Retry-After": str(self.cfg.busy_retry_after_s)},
        )

    async def _store_parts(self, request: Request, parts: list[tuple[str, Path]]) -> Response:
        """Each spooled part through `Intake.receive`; the PS3.18 Store Instances response for the outcome."""
        stored: list[Dataset] = []
        failed: list[Dataset] = []
        out_of_resources = False
        key_id = key_fingerprint(_api_key(request)) or None
        peer = self._client(request)
        for part_type, path in parts:
            if part_type != "application/dicom":
                refusal = Refusal(RefusalKind.CANNOT_UNDERSTAND, f"part of type {part_type}")
                self.intake.audit_refusal(
                    refusal, intake="stow", node_ae=self.intake.ae_title, api_key_id=key_id, peer=peer
                )
                metrics.refused("stow", refusal.stow_failure_reason)
                failed.append(refusal.failed_sop_item())
                continue
            data = await asyncio.to_thread(path.read_bytes)
            try:
                received = await asyncio.to_thread(self.intake.receive, data, via="stow", api_key_id=key_id, peer=peer)
            except Refusal as refusal:
                metrics.refused("stow", refusal.stow_failure_reason)
                failed.append(refusal.failed_sop_item())
                continue
            except (QueueFullError, OSError, sqlite3.Error) as exc:
                if isinstance(exc, QueueFullError):
                    log.warning("queue full: a STOW-RS instance refused with 0xA700")
                else:
                    log.error("could not keep an instance: %s", type(exc).__name__)
                metrics.refused("stow", OUT_OF_RESOURCES)
                failed.append(_out_of_resources(data))
                out_of_resources = True
                continue
            metrics.accepted("stow")
            accepted = received.accepted
            stored.append(_referenced(accepted.sop_class_uid, accepted.sop_instance_uid))
        answer = Dataset()
        if stored:
            answer.ReferencedSOPSequence = stored
        if failed:
            answer.FailedSOPSequence = failed
        if out_of_resources and not stored:
            log.warning("nothing of a STOW-RS request stored: answered 503")
            metrics.refused("stow", "http_503")
            return self._busy(answer)
        status = 200 if not failed else (202 if stored else 409)
        return JSONResponse(answer.to_json_dict(), status_code=status, media_type=DICOM_JSON)


class _Spooler:
    """Writes parser events to one file per part, so a part's bytes are on disk, not in memory, until used."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.parts: list[tuple[str, Path]] = []
        self._current: IO[bytes] | None = None

    def write(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, PartStart):
                fd, name = tempfile.mkstemp(dir=self.spool, prefix="part-")
                self._current = open(fd, "wb")
                self.parts.append((event.content_type, Path(name)))
            elif isinstance(event, PartData):
                assert self._current is not None
                self._current.write(event.data)
            else:
                self.close()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


class _TooLarge(Exception):
    """The STOW-RS body passed stow_max_request_mb while it was being read."""
