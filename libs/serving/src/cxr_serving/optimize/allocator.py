"""Keep the CPU memory a forward frees for the next forward (glibc malloc settings, via mallopt).

A CPU forward allocates its activations (tens of MB each at batch 8: a U-Net decoder stage at
256 px is 64 MB) and frees them when it returns. With glibc's defaults the next forward gets
them back from the kernel: allocations over the mmap threshold (at most 32 MB) are fresh
mappings, and a thread's own arena (every forward thread gets one) trims its heap after frees.
Each page then faults in and is zeroed again, system time that a CPU forward pays on every batch.
This is why Intel's and TorchServe's CPU guides swap in jemalloc/tcmalloc; we keep glibc and
change three of its settings in-process:

- M_ARENA_MAX 1: one heap for every thread (forwards take a lock a few hundred times per
  batch; small allocations still come from per-thread caches);
- M_MMAP_MAX 0: no allocation is its own mapping, so large ones come from that heap too;
- M_TOP_PAD pad: after a free, up to `pad` bytes stay at the top of the heap instead of going
  back to the kernel.

The process keeps up to `pad` MiB of freed memory (RSS), and memory freed under a live
allocation stays in the heap for reuse rather than returning to the kernel. The settings hold
for the life of the process; `performance.cpu_heap_pad_mb: 0` leaves glibc's defaults. On a
C library other than glibc (musl, macOS) nothing changes and the reason is logged.
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
