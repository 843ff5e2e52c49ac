"""cxr_client against real servers of the shared runtime (toy model): auth, deadlines, retries,
typed errors, sync and async clients, batch helper."""

from __future__ import annotations

import time

import grpc
import pytest

from cxr_client import (
    AsyncCxrClient,
    AuthenticationError,
    ClientConfig,
    CxrClient,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidImageError,
    ServerError,
    UnavailableError,
    batch_process_images,
)
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_serving.errors import ModelNotReadyError
from cxr_serving.server import ServiceBinding
from tests.support.paths import cxr14_images
from tests.support.servers import TEST_KEY, free_port, make_settings, running_server
from tests.support.service_process import service_process
from tests.support.toy_service import SERVICE, BrightnessModel, build_toy


def config(server, **kw) -> ClientConfig:
    return ClientConfig(endpoint=f"127.0.0.1:{server.port}", api_key=kw.pop("api_key", TEST_KEY), **kw)


class FlakyServicer(pb_grpc.ClassificationServiceServicer):
    """Raises the runtime's ModelNotReadyError (UNAVAILABLE) for the first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def ListModels(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            raise ModelNotReadyError("model 'toy' is loading")
        return pb.ListModelsResponse()


def flaky_binding(servicer: FlakyServicer) -> ServiceBinding:
    return ServiceBinding(
        name="classification",
        full_service_names=[SERVICE],
        register=lambda server: pb_grpc.add_ClassificationServiceServicer_to_server(servicer, server),
    )


async def test_classify_with_api_key_and_metadata(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, AsyncCxrClient(config(server)) as client:
        resp = await client.classify(cxr14_images(1)[0])  # a path
        assert resp.untrained and resp.predictions[0].findings[0].label == "bright"
        resp2 = await client.classify(sample_png)  # bytes
        assert resp2.predictions[0].findings[0].probability == pytest.approx(
            resp.predictions[0].findings[0].probability
        )
        models = await client.list_models("classification")
        assert [m.name for m in models] == ["toy"]
        assert await client.health("classification") == "SERVING"


async def test_missing_and_wrong_key_raise_authentication_error(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server:
        for key, reason in ((None, "API_KEY_MISSING"), ("wrong", "API_KEY_INVALID")):
            async with AsyncCxrClient(config(server, api_key=key)) as client:
                with pytest.raises(AuthenticationError) as err:
                    await client.classify(sample_png)
                assert err.value.reason == reason and err.value.code is grpc.StatusCode.UNAUTHENTICATED
                assert err.value.domain == "cxr.platform"
                assert await client.health("classification") == "SERVING"  # health needs no key


async def test_error_translation_carries_error_info(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, AsyncCxrClient(config(server)) as client:
        with pytest.raises(InvalidImageError) as err:
            await client.classify(b"not an image at all")
        assert err.value.reason == "IMAGE_FORMAT_UNKNOWN"
        assert err.value.correlation_id  # from the trailers of the failed call
        with pytest.raises(InvalidArgumentError) as err2:
            await client.classify(sample_png, model_names=["bad"])
        assert not isinstance(err2.value, InvalidImageError) and err2.value.reason == "INVALID_INPUT"
        with pytest.raises(ServerError) as err3:
            await client.classify(sample_png, model_names=["explode"])
        assert err3.value.reason == "INTERNAL" and "secret" not in str(err3.value)
        assert err3.value.correlation_id in str(err3.value)


async def test_deadline_is_enforced(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s, BrightnessModel(delay_s=1.0))) as server:
        async with AsyncCxrClient(config(server, timeout_s=0.2)) as client:
            started = time.perf_counter()
            with pytest.raises(DeadlineExceededError):
                await client.classify(sample_png)
            assert time.perf_counter() - started < 0.9
            # a per-call timeout wins over the default
            resp = await client.classify(sample_png, timeout=10)
            assert resp.predictions


async def test_retry_policy_replays_unavailable_from_the_runtime():
    s = make_settings()
    servicer = FlakyServicer(failures=2)
    async with running_server(s, flaky_binding(servicer)) as server:
        async with AsyncCxrClient(config(server)) as client:
            assert await client.list_models("classification") == []
        assert servicer.calls == 3  # two UNAVAILABLE, replayed by the channel's retry policy
        servicer.calls = 0
        async with AsyncCxrClient(config(server, retries=False)) as client:
            with pytest.raises(UnavailableError) as err:
                await client.list_models("classification")
        assert err.value.reason == "MODEL_NOT_READY" and servicer.calls == 1


async def test_retry_gives_up_after_max_attempts():
    s = make_settings()
    servicer = FlakyServicer(failures=100)
    async with running_server(s, flaky_binding(servicer)) as server, AsyncCxrClient(config(server)) as client:
        with pytest.raises(UnavailableError):
            await client.list_models("classification")
        assert servicer.calls == 4  # maxAttempts of the published policy


async def test_unreachable_server_is_a_typed_unavailable_error(sample_png):
    """Connection refused is UNAVAILABLE: retried by the policy, then raised as UnavailableError."""
    port = free_port()
    cfg = ClientConfig(endpoint=f"127.0.0.1:{port}", api_key=TEST_KEY, timeout_s=10)
    async with AsyncCxrClient(cfg) as client:
        with pytest.raises(UnavailableError):
            await client.classify(sample_png)  # nothing listens: 4 attempts, then a typed error
        assert await client.health("classification") == "UNREACHABLE"


def test_sync_client_matches_async(sample_png, tmp_path):
    """The sync client talks to the toy service in its own process (never to a server on a thread of this one)."""
    with (
        service_process(tmp_path) as svc,
        CxrClient(ClientConfig(endpoint=svc.target, api_key=TEST_KEY)) as client,
    ):
        resp = client.classify(sample_png)
        assert resp.predictions[0].model.name == "toy"
        assert client.health_all()["classification"] == "SERVING"
        with pytest.raises(InvalidImageError):
            client.classify(b"garbage")


async def test_batch_process_folder_bounded_and_ordered(tmp_path):
    images = cxr14_images(6)
    for p in images[:4]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("ignored")
    model = BrightnessModel(delay_s=0.05)
    s = make_settings(**{"server_config__max_batch_size": 8, "server_config__max_batch_delay_ms": 20})
    async with running_server(s, build_toy(s, model)) as server, AsyncCxrClient(config(server)) as client:
        summary = await batch_process_images(client, [tmp_path, images[5]], concurrency=2, progress=False)
    names = [r.path.name for r in summary.results]
    assert names == [*sorted(p.name for p in tmp_path.glob("*.png")), images[5].name]
    assert len(summary.failed) == 1 and summary.failed[0].path.name == "broken.png"
    assert isinstance(summary.failed[0].error, InvalidImageError)
    assert all(r.response.predictions for r in summary.results if r.ok)
    assert max(model.batches) <= 2 and sum(model.batches) == 5  # never more than `concurrency` in flight
    assert summary.images_per_second > 0


async def test_retry_policy_works_through_the_gateway():
    from tests.support.gateway_helpers import running_gateway

    s = make_settings()
    servicer = FlakyServicer(failures=2)
    async with (
        running_server(s, flaky_binding(servicer)) as server,
        running_gateway({"classification": server.port}) as gw,
    ):
        cfg = ClientConfig(endpoint=f"127.0.0.1:{gw.ports.grpc}", api_key=TEST_KEY)
        async with AsyncCxrClient(cfg) as client:
            assert await client.list_models("classification") == []
    assert servicer.calls == 3  # the gateway passes UNAVAILABLE through trailers-only: the client replays it
