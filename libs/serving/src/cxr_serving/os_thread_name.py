"""Gives the calling thread its name in the kernel too (what `top -H`, `ps -L` and /proc/<pid>/task/<tid>/comm
show), so an operator and the benchmarks can tell a service's event loop from its decode and model threads:
Python 3.11 names threads for itself only."""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import Any

_PR_SET_NAME = 15
KERNEL_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating zero


@cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:  # the symbols already loaded into this process (libc's prctl among them): no library search
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def kernel_name(name: str) -> bytes:
    """`name` as the kernel keeps it: ASCII, at most 15 bytes, the end kept when it is longer (the end is
    what tells a pool's threads apart)."""
    raw = name.encode("ascii", "replace")
    return raw[-KERNEL_NAME_BYTES:] if len(raw) > KERNEL_NAME_BYTES else raw


def name_os_thread(name: str) -> bool:
    """Set the calling thread's kernel name; False where the platform has no such name (it is only a label)."""
    libc = _libc()
    if libc is None:
        return False
    return int(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(kernel_name(name)), 0, 0, 0)) == 0
