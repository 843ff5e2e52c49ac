"""`priority` through the gateway stand-in's REST transcoding (generic from the protos): a JSON body field
that reaches the batcher of the real runtime behind it (toy service)."""

from __future__ import annotations

import base64

import aiohttp
from prometheus_client import REGISTRY

from tests.support.gateway_helpers import running_gateway
from tests.support.servers import TEST_KEY, make_settings, running_server
from tests.support.toy_service import build_toy

KEY = {"apikey": TEST_KEY}


def _queued(priority: str) -> float:
    return REGISTRY.get_sample_value("cxr_requests_queued_total", {"model": "toy", "priority": priority}) or 0.0


async def test_rest_clients_send_priority_as_a_body_field(sample_png):
    settings = make_settings()
    image = {"data": base64.b64encode(sample_png).decode(), "contentType": "image/png"}
    before = {p: _queued(p) for p in ("stat", "routine")}
    async with (
        running_server(settings, build_toy(settings)) as be,
        running_gateway({"classification": be.port}) as gw,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{gw.ports.rest}/v1/classification:classifyImage"
        for body in ({"image": image, "priority": "PRIORITY_STAT"}, {"image": image, "priority": 1}):
            async with http.post(url, json=body, headers=KEY) as r:
                assert r.status == 200, await r.text()
        async with http.post(url, json={"image": image}, headers=KEY) as r:
            assert r.status == 200, await r.text()
        # an unknown name is discarded like an unknown field (grpc-gateway's DiscardUnknown): routine
        async with http.post(url, json={"image": image, "priority": "PRIORITY_URGENT"}, headers=KEY) as r:
            assert r.status == 200, await r.text()
    assert _queued("stat") - before["stat"] == 2
    assert _queued("routine") - before["routine"] == 2
