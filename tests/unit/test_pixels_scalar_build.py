"""`_pixels.c` built without its SSE2 paths (as on a CPU or compiler without SSE2: `-U__SSE2__`) gives OpenCV's
samples on every filter mix and on shared NIH PNGs, as the SSE2 build does: the scalar four-row wavefront and
the row-by-row loop are the only code such a build runs, and CI builds it here."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

from cxr_serving import png_gray8
from tests.support.paths import cxr14_images
from tests.support.png_writer import gray8_png, opencv_decode, random_filter_mixes

SOURCE = Path(png_gray8.__file__).with_name("_pixels.c")


def compiler() -> list[str]:
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        # the serving package builds this extension at install: a host that built it has a compiler
        pytest.fail(f"no C compiler ({cc[0]}) to build _pixels.c without SSE2")
    return cc


@pytest.fixture(scope="module")
def scalar_unfilter(tmp_path_factory):
    out = tmp_path_factory.mktemp("scalar") / f"_pixels{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    flags = [
        *(sysconfig.get_config_var("CFLAGS") or "-O3").split(),
        *(sysconfig.get_config_var("CCSHARED") or "-fPIC").split(),
    ]
    built = subprocess.run([*compiler(), *flags, "-shared", "-U__SSE2__", f"-I{include}", str(SOURCE), "-o", str(out)],
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr  # the compiler's own words when it fails
    loader = importlib.machinery.ExtensionFileLoader("_pixels", str(out))
    spec = importlib.util.spec_from_file_location("_pixels", out, loader=loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.png_unfilter_into


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="SSE2 is an x86-64 instruction set")
def test_the_scalar_build_leaves_out_every_sse2_path():
    def preprocessed(*flags: str) -> str:
        return subprocess.run([*compiler(), "-E", *flags, f"-I{sysconfig.get_paths()['include']}", str(SOURCE)],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip

    assert "unfilter_16_rows" in preprocessed()  # the default build on x86-64 has the sixteen-lane path
    assert "unfilter_16_rows" not in preprocessed("-U__SSE2__") and "_mm_" not in preprocessed("-U__SSE2__")


@pytest.mark.parametrize("height", [1, 3, 4, 16, 17, 33, 70])
def test_scalar_build_equals_opencv_for_every_filter_mix(height, scalar_unfilter, monkeypatch):
    monkeypatch.setattr(png_gray8, "unfilter_into", scalar_unfilter)
    for width, trial, data in random_filter_mixes(height, (1, 3, 4, 5, 32, 33, 49, 100)):
        fast = png_gray8.decode(data)
        assert fast is not None and np.array_equal(fast, opencv_decode(data)), (width, trial)


def test_scalar_build_equals_opencv_on_shared_nih_pngs(scalar_unfilter, monkeypatch):
    calls = []

    def counted(*args: object) -> object:
        calls.append(1)
        return scalar_unfilter(*args)

    monkeypatch.setattr(png_gray8, "unfilter_into", counted)
    paths = cxr14_images()[:8]
    for path in paths:
        data = path.read_bytes()
        fast = png_gray8.decode(data)
        assert fast is not None and np.array_equal(fast, opencv_decode(data)), path.name
    assert len(calls) == len(paths)  # every image went through the scalar build


@pytest.mark.parametrize("bad_row", [0, 5, 19])
def test_scalar_build_declines_a_filter_type_png_does_not_define(bad_row, scalar_unfilter, monkeypatch):
    """A row whose filter byte is over 4 leaves the image to the general decoder, as in the SSE2 build."""
    monkeypatch.setattr(png_gray8, "unfilter_into", scalar_unfilter)
    height, width = 20, 40
    raw = bytearray(np.random.default_rng(bad_row).integers(0, 256, height * (width + 1), dtype=np.uint8).tobytes())
    raw[:: width + 1] = bytes([4] * height)
    raw[bad_row * (width + 1)] = 5
    assert png_gray8.decode(gray8_png(np.zeros((height, width), np.uint8), stream=zlib.compress(bytes(raw)))) is None
    raw[bad_row * (width + 1)] = 4
    decoded = png_gray8.decode(gray8_png(np.zeros((height, width), np.uint8), stream=zlib.compress(bytes(raw))))
    assert decoded is not None and decoded.shape == (height, width)
