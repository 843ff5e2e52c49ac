"""The start-up heap taken out of the cyclic garbage collector's view, in a service process only.

A full collection walks every tracked object; a service process imports torch, gRPC and the platform
(~380k objects) before it serves, so it freezes what start-up made (docs/serving-runtime.md). A test or
benchmark that hosts a service in its own process keeps its heap collectable: only a process that
`serve_this_process` marked freezes. Kept apart from the CLI so that frontends and the DICOM node can use
it without importing the CLI's tracing set-up.
"""

from __future__ import annotations

import gc

_service_process = False  # set by the process's entry point (cli.run_service, a frontend's main)


def serve_this_process() -> None:
    """This process exists to run one service: `freeze_startup_heap` may freeze its heap."""
    global _service_process
    _service_process = True


def freeze_startup_heap() -> bool:
    """Take what start-up made (the imported libraries, settings, the server) out of the collector's view, so
    that a full collection while serving walks the objects made since, not the whole process. Models load
    after it and stay in view: an unloaded model's reference cycles are still freed. Returns whether it froze
    (only in a service process)."""
    if not _service_process:
        return False
    gc.collect()  # start-up's own garbage is freed first, not kept for good
    gc.freeze()
    return True
