"""STOW-RS through the Kong stand-in (kong.yml's `dicom-stow` service, plain HTTP) to the real DICOM node of the
test stack (tests/support/client_stack.py): the body is streamed to the node, the node's own answer (status,
Content-Type, DICOM JSON) comes back, and key-auth, acl, rate-limiting and request-size-limiting apply first."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_client import CxrClient, NotFoundError
from tests.support.client_stack import get_stack
from tests.support.gateway_helpers import ADMIN_KEY, global_plugin, running_gateway
from tests.support.paths import dicom_files
from tests.support.servers import TEST_KEY

pytestmark = pytest.mark.slow  # starts the real stack (shared with the other e2e tests)

BOUNDARY = "cxr-gw-stow-5d2e"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, REFERENCED_SOP_INSTANCE = "00081198", "00081199", "00081155"


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


def stow_ports(stack) -> dict[str, int]:
    return {**stack.ports, "dicom-stow": stack.servers["dicom"].binding.extra["node"].stow_port}


def new_instance() -> tuple[pydicom.Dataset, bytes]:
    """A shared DICOM as a new study (new Study/Series/SOP UIDs), as Part 10 bytes."""
    ds = pydicom.dcmread(dicom_files()[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ds, buf.getvalue()


def multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: " + ct.encode() + b"\r\n\r\n" + data + b"\r\n"
        for ct, data in parts
    )
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


async def chunks(data: bytes, size: int = 32 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def known_to_node(stack, study: str) -> bool:
    with CxrClient(stack.config()) as client:
        try:
            return len(client.study_status(study).instances) == 1
        except NotFoundError:
            return False


async def test_stow_through_the_gateway_reaches_the_node(stack):
    async with running_gateway(stow_ports(stack)) as gw, httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies"
        ds, data = new_instance()
        r = await http.post(
            url,
            content=multipart(("application/dicom", data)),
            headers={"apikey": TEST_KEY, "Content-Type": CONTENT_TYPE, "X-Correlation-ID": "stow-corr-1"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/dicom+json")
        (ref,) = r.json()[REFERENCED_SOP_SEQUENCE]["Value"]
        assert ref[REFERENCED_SOP_INSTANCE]["Value"] == [ds.SOPInstanceUID]
        assert r.headers["x-correlation-id"] == "stow-corr-1" and r.headers["ratelimit-limit"] == "100"
        assert int(r.headers["x-kong-upstream-latency"]) >= 0
        assert known_to_node(stack, ds.StudyInstanceUID)  # accepted and queued by the node

        # no Content-Length: the body is streamed to the node in chunks (Transfer-Encoding: chunked)
        ds2, data2 = new_instance()
        r = await http.post(
            url,
            content=chunks(multipart(("application/dicom", data2))),
            headers={"x-api-key": TEST_KEY, "Content-Type": CONTENT_TYPE},
        )
        assert r.status_code == 200, r.text
        assert known_to_node(stack, ds2.StudyInstanceUID)


async def test_stow_key_auth_and_acl_refuse_before_the_node(stack):
    async with running_gateway(stow_ports(stack)) as gw, httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies"
        ds, data = new_instance()
        body = multipart(("application/dicom", data))
        r = await http.post(url, content=body, headers={"Content-Type": CONTENT_TYPE})
        assert r.status_code == 401 and r.json()["message"] == "No API key found in request"
        assert r.headers["www-authenticate"] == 'Key realm="kong"'
        r = await http.post(url, content=body, headers={"apikey": "wrong-key", "Content-Type": CONTENT_TYPE})
        assert r.status_code == 401 and r.json()["message"] == "Invalid authentication credentials"
        # the admin consumer is not in the route's acl: studies come with the inference key
        r = await http.post(url, content=body, headers={"apikey": ADMIN_KEY, "Content-Type": CONTENT_TYPE})
        assert r.status_code == 403 and r.json()["message"] == "You cannot consume this service"
        assert not known_to_node(stack, ds.StudyInstanceUID)
        r = await http.get(url, headers={"apikey": TEST_KEY})
        assert r.status_code == 404 and r.json()["message"] == "no Route matched with those values"


async def test_stow_node_refusals_pass_through(stack):
    async with running_gateway(stow_ports(stack)) as gw, httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies"
        headers = {"apikey": TEST_KEY, "Content-Type": CONTENT_TYPE}
        r = await http.post(url, content=multipart(("application/dicom", b"not a DICOM file" * 64)), headers=headers)
        assert r.status_code == 409, r.text  # the node's STOW failure: a FailedSOPSequence, nothing stored
        assert r.headers["content-type"].startswith("application/dicom+json")
        assert len(r.json()[FAILED_SOP_SEQUENCE]["Value"]) == 1 and REFERENCED_SOP_SEQUENCE not in r.json()
        r = await http.post(url, content=b"{}", headers={"apikey": TEST_KEY, "Content-Type": "application/json"})
        assert r.status_code == 415 and "multipart/related" in r.json()["error"]


async def test_stow_size_limit_declared_and_streamed(stack):
    def small(kong):
        size = next(p for p in kong.service("dicom-stow").plugins if p.name == "request-size-limiting")
        size.config.allowed_payload_size, size.config.size_unit = 64, "kilobytes"

    async with running_gateway(stow_ports(stack), mutate=small) as gw, httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies"
        headers = {"apikey": TEST_KEY, "Content-Type": CONTENT_TYPE}
        ds, data = new_instance()
        body = multipart(("application/dicom", data))
        assert len(body) > 64 * 1024
        r = await http.post(url, content=body, headers=headers)  # declared Content-Length over the limit
        assert r.status_code == 413 and r.json()["details"][0]["reason"] == "REQUEST_TOO_LARGE"
        r = await http.post(url, content=chunks(body), headers=headers)  # no Content-Length: counted while streamed
        assert r.status_code == 413 and r.json()["details"][0]["reason"] == "REQUEST_TOO_LARGE"
        assert not known_to_node(stack, ds.StudyInstanceUID)


async def test_stow_rate_limit(stack):
    def tight(kong):
        global_plugin(kong, "rate-limiting").config.minute = 3

    async with running_gateway(stow_ports(stack), mutate=tight) as gw, httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies"
        statuses = []
        for _ in range(4):
            r = await http.post(url, content=b"{}", headers={"apikey": TEST_KEY, "Content-Type": "application/json"})
            statuses.append(r.status_code)
        assert statuses == [415, 415, 415, 429], statuses  # the node answered three; the fourth never reached it
        assert r.json()["message"] == "API rate limit exceeded" and int(r.headers["retry-after"]) >= 1
        assert r.json()["details"][0]["reason"] == "RATE_LIMIT_EXCEEDED"
