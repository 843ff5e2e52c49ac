"""Keep the CPU memory a forward frees for the next forward (glibc malloc settings, via mallopt).

With glibc's defaults every CPU forward gets its activations back from the kernel and pays to fault
in and zero each page again; three mallopt settings keep that memory in the heap instead (which ones,
and what they cost: docs/serving-runtime.md).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
MAX_PAD_MB = 2047  # mallopt takes a C int of bytes

_applied_pad_mb: int | None = None


def libc_is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def keep_freed_memory(pad_mb: int) -> bool:
    """Apply the settings above with `pad_mb` MiB of top pad; True when they are in effect.
    0 does nothing (glibc's defaults, or whatever an earlier call set: mallopt has no undo)."""
    global _applied_pad_mb
    if pad_mb <= 0:
        return False
    if not 0 < pad_mb <= MAX_PAD_MB:
        raise ValueError(f"pad_mb must be 1..{MAX_PAD_MB}, got {pad_mb}")
    if _applied_pad_mb == pad_mb:
        return True
    if not libc_is_glibc():
        log.info("performance.cpu_heap_pad_mb has no effect: the C library is not glibc (%s)", platform.libc_ver())
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TOP_PAD, pad_mb << 20))
    refused = [param for param, value in settings if mallopt(param, value) != 1]
    if refused:
        log.warning("glibc mallopt refused parameters %s: CPU heap left partly at its defaults", refused)
        return False
    _applied_pad_mb = pad_mb
    log.info("CPU heap: one glibc arena, no per-allocation mmap, %d MiB kept after frees", pad_mb)
    return True
