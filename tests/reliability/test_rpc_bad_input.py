"""Hostile input through a real gRPC server, for the toy service and every real service that
is importable: mutated image bytes (truncated, bit-flipped, random, wrong content type) and
malformed protobuf fields (NaN thresholds, empty lists, giant strings, unknown enum values).
Promise: image problems are INVALID_ARGUMENT, never INTERNAL/UNKNOWN, and the server keeps
serving (health SERVING, a valid request still succeeds). One server per target for the whole
module, on the module's event loop, called by grpc.aio clients on that same loop."""

from __future__ import annotations

import warnings

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_serving.images import CONTENT_TYPES
from fuzz.seeds import seed_inputs
from tests.support.servers import auth, running_server
from tests.support.targets import IMG, Call, Target, available_targets

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.asyncio(loop_scope="module")

TARGETS = {t.name: t for t in available_targets()}
SEEDS = {k: v for k, v in seed_inputs(small_only=True).items() if len(v) < 50_000}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(TARGETS))
async def served(request):
    target: Target = TARGETS[request.param]
    settings_ = target.settings()
    options = [("grpc.max_send_message_length", 1 << 27)]
    async with (
        running_server(settings_, target.build(settings_)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch,
    ):
        yield target, ch


async def invoke(ch: grpc.aio.Channel, target: Target, call: Call, timeout: float = 60) -> grpc.StatusCode:
    fn = getattr(target.stub(ch), call.method)
    try:
        if call.streaming:
            async for _ in fn(call.request, metadata=auth(), timeout=timeout):
                pass
        else:
            await fn(call.request, metadata=auth(), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        assert err.code() not in NEVER, f"{call.method}: {err.code()} {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


async def assert_still_serving(ch: grpc.aio.Channel, target: Target) -> None:
    health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert await invoke(ch, target, target.valid(IMG, "image/png")) == grpc.StatusCode.OK


IMAGE_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@EXAMPLES
@given(
    name=st.sampled_from(sorted(SEEDS)),
    cut=st.floats(0.05, 1.0),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=6),
    ctype=st.sampled_from(["", *CONTENT_TYPES]),
)
async def test_mutated_images_are_invalid_argument(served, name, cut, flips, ctype):
    target, ch = served
    if not target.image_input:
        pytest.skip(f"{target.name} takes no image")
    data = bytearray(SEEDS[name][: max(1, int(len(SEEDS[name]) * cut))])
    for pos, bit in flips:
        data[min(int(pos * len(data)), len(data) - 1)] ^= 1 << bit
    assert await invoke(ch, target, target.valid(bytes(data), ctype)) in IMAGE_OK


@EXAMPLES
@given(data=st.binary(max_size=4096), ctype=st.one_of(st.sampled_from(list(CONTENT_TYPES)), st.text(max_size=64)))
async def test_random_bytes_and_content_types(served, data, ctype):
    target, ch = served
    if not target.image_input:
        pytest.skip(f"{target.name} takes no image")
    assert await invoke(ch, target, target.valid(data, ctype)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_zero_size_and_oversized_messages(served):
    target, ch = served
    if not target.image_input:
        pytest.skip(f"{target.name} takes no image")
    assert await invoke(ch, target, target.valid(b"", "")) == grpc.StatusCode.INVALID_ARGUMENT
    # over max_message_mb (64): gRPC itself refuses the message before any handler runs
    code = await invoke(ch, target, target.valid(b"\x89PNG\r\n\x1a\n" + bytes(65 * 1024 * 1024), "image/png"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serving(ch, target)


async def test_malformed_fields_never_internal(served):
    target, ch = served
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
    seen = {}
    for call in target.malformed:
        code = await invoke(ch, target, call)
        seen[f"{call.method}:{str(call.request)[:60]}"] = code
        assert code in allowed, (call.method, code)
    await assert_still_serving(ch, target)


async def test_still_serving_after_everything(served):
    target, ch = served
    await assert_still_serving(ch, target)
