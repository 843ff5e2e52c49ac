"""Folders of images: bounded concurrency and a progress bar (the deployment guide's `batch_process_images`)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from cxr_client.client import AsyncCxrClient
from cxr_client.errors import CxrClientError
from cxr_client.images import iter_image_files

Operation = Literal["classify", "segment"]


@dataclass
class BatchResult:
    """One image's outcome: `response` (a protobuf message) or `error`, never both."""

    path: Path
    response: Any = None
    error: CxrClientError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchSummary:
    results: list[BatchResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[BatchResult]:
        return [r for r in self.results if not r.ok]

    @property
    def images_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds > 0 else 0.0


async def batch_process_images(
    client: AsyncCxrClient,
    paths: Iterable[str | os.PathLike[str]],
    *,
    operation: Operation = "classify",
    concurrency: int = 8,
    progress: bool = True,
    **call_kwargs: Any,
) -> BatchSummary:
    """Run `operation` on every image (folders are expanded), at most `concurrency` calls in flight.

    Results come back in input order; a failed image is recorded with its typed error and does
    not stop the others. `call_kwargs` go to `client.classify` / `client.segment`.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    files = list(iter_image_files(paths))
    call = client.classify if operation == "classify" else client.segment
    results = [BatchResult(path=p) for p in files]
    bar = tqdm(total=len(files), desc=operation, unit="img", disable=not progress, leave=False)
    queue: asyncio.Queue[BatchResult] = asyncio.Queue()
    for r in results:
        queue.put_nowait(r)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            try:
                data = await asyncio.to_thread(item.path.read_bytes)  # file I/O off the event loop
                item.response = await call(data, **call_kwargs)
            except CxrClientError as err:
                item.error = err
            except OSError as err:
                item.error = CxrClientError(f"cannot read {item.path}: {err.strerror or err}", reason="FILE_UNREADABLE")
            item.seconds = time.perf_counter() - started
            bar.update(1)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(files)) or 1)))
    finally:
        bar.close()
    return BatchSummary(results=results, seconds=time.perf_counter() - started)
