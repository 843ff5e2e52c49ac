"""bench.host_fingerprint: every workload timed on the real NIH images, and /proc/cpuinfo read as the kernel
writes it (the first processor's block)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import host_fingerprint
from cxr_serving import pixel_kernels, png_gray8, resize


def test_the_fingerprint_times_every_workload_and_names_the_host(tmp_path: Path) -> None:
    out = tmp_path / "fp.json"
    assert host_fingerprint.main(["--quick", "--images", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = data["cells"]
    kernels = {"resize_normalize_224"} if resize.kernel_built() else set()
    kernels |= {"png_gray8"} if png_gray8.kernel_built() else set()
    assert set(cells) == {"decode_png", "opencv_png", "copy_64mib", "python_loop"} | kernels
    assert all(c["wall_p50_ms"] > 0 and c["cpu_p50_ms"] >= 0 for c in cells.values())
    assert data["pixel_kernels_missing"] == pixel_kernels.missing() and data["turns"] == 5 and data["images"] == 2
    assert data["copy_gib_per_s"] > 0 and data["host"]["cpu_count"] >= 1


def test_cpu_info_reads_the_first_processor(tmp_path: Path) -> None:
    text = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2100.5\nflags\t\t: sse4_2 avx2 amx_tile\n\n"
    (tmp_path / "cpuinfo").write_text(text + text.replace("Some CPU", "Other").replace("avx2", ""))
    info = host_fingerprint.cpu_info(tmp_path / "cpuinfo")
    assert (info["model"], info["mhz"]) == ("Some CPU", 2100.5)
    assert info["flags"]["avx2"] and info["flags"]["amx_tile"] and not info["flags"]["avx512f"]
    assert host_fingerprint.cpu_info(tmp_path / "missing")["flags"] == {}
