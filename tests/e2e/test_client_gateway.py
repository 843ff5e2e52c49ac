"""cxr_client through the gateway's single gRPC endpoint (the Kong stand-in) to the three real
services: the analyze workflow and the CLI need nothing but CXR_ENDPOINT + CXR_API_KEY."""

from __future__ import annotations

import pytest

from cxr_client import AsyncCxrClient, AuthenticationError, ClientConfig
from cxr_client.analyze import analyze_study
from tests.support.client_stack import POSITIVE, get_stack
from tests.support.gateway_helpers import running_gateway
from tests.support.paths import cxr14_images
from tests.support.servers import TEST_KEY

pytestmark = pytest.mark.slow  # shares the real-services stack (see client_stack.py)


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


async def test_analyze_through_one_gateway_endpoint(stack):
    async with running_gateway(stack.ports) as gw:
        cfg = ClientConfig(endpoint=f"127.0.0.1:{gw.ports.grpc}", api_key=TEST_KEY, timeout_s=60)
        async with AsyncCxrClient(cfg) as client:
            assert len(client._channels) == 0
            report = await analyze_study(client, cxr14_images(1)[0], top_k=1)
            assert len(client._channels) == 1  # one connection carries all three services
            assert report.errors == {} and report.positive_findings == [POSITIVE]
            assert report.literature or report.literature_notes  # the search ran (the stack's corpus: a refusal)
            models = await client.list_models("segmentation")
            assert models[0].name == "segmentation"
            # the gateway routes only the cxr APIs: health falls back to ListModels / SearchLiterature / ListDeadLetters
            assert await client.health_all() == dict.fromkeys(
                ("classification", "segmentation", "rag", "dicom"), "SERVING"
            )
        async with AsyncCxrClient(cfg.model_copy(update={"api_key": "wrong"})) as client:
            with pytest.raises(AuthenticationError):
                await client.list_models("classification")
