"""Which asyncio event loop a server process runs (`server_config.event_loop`, the gateway's
`--event-loop`): uvloop (libuv) when it is installed, else asyncio's own.

uvloop is the default because every request wakes the loop from other threads (the decode pool, the
model threads) and libuv's wake-ups are cheaper, which shortens each call at low concurrency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from cxr_serving.errors import ConfigError

T = TypeVar("T")
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
CHOICES: tuple[str, ...] = get_args(EventLoopChoice)
Runner = Callable[[Coroutine[Any, Any, T]], T]


def runner(choice: str = "auto") -> tuple[Runner[Any], str]:
    """(run function, its name): uvloop.run for "auto" when uvloop imports and for "uvloop", else
    asyncio.run. Raises ConfigError when "uvloop" is asked for and is not installed."""
    if choice not in CHOICES:
        raise ConfigError(f"event loop must be 'auto', 'uvloop' or 'asyncio', not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event loop 'uvloop' is not installed (pip install uvloop), or use 'auto'") from None
        else:
            return uvloop.run, "uvloop"
    return asyncio.run, "asyncio"
