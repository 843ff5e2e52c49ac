"""A real grpc.aio server on its own event loop thread, so that synchronous tests (hypothesis
`@given`, load loops) can share one server across many examples."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cxr_serving.server import CxrServer, ServiceBinding
from cxr_serving.settings import Settings
from tests.support.servers import running_server


@contextmanager
def server_in_thread(
    settings: Settings, build: Callable[[Settings], ServiceBinding], *, wait_ready: bool = True, timeout: float = 180
) -> Iterator[CxrServer]:
    """Build the binding and run the server on a private loop; yields once it listens (and is ready)."""
    started = threading.Event()
    stop: asyncio.Event | None = None
    holder: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            async with running_server(settings, build(settings), wait_ready=wait_ready) as server:
                holder["server"] = server
                started.set()
                await stop.wait()
        except BaseException as exc:
            holder["error"] = exc
            started.set()
            raise

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException:  # reported through holder
            pass

    thread = threading.Thread(target=run, name="cxr-test-server", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError("server did not start")
    if "error" in holder:
        raise RuntimeError("server failed to start") from holder["error"]  # type: ignore[arg-type]
    try:
        yield holder["server"]  # type: ignore[misc]
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
