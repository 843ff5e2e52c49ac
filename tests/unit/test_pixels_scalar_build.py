"""`_pixels.c` built without its SSE2 paths (as on a CPU or compiler without SSE2: `-U__SSE2__`) gives OpenCV's
samples on every filter mix and on shared NIH PNGs, as the SSE2 build does: the scalar four-row wavefront and
the row-by-row loop are the only code such a build runs, and CI builds it here."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from cxr_serving import png_gray8
from tests.support.paths import cxr14_images
from tests.support.png_writer import random_filter_mixes
from tests.unit.test_png_gray8 import opencv

SOURCE = Path(png_gray8.__file__).with_name("_pixels.c")


def compiler() -> list[str]:
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        # the serving package builds this extension at install: a host that built it has a compiler
        pytest.fail(f"no C compiler ({cc[0]}) to build _pixels.c without SSE2")
    return cc


@pytest.fixture(scope="module")
def scalar_unfilter(tmp_path_factory):
    out = tmp_path_factory.mktemp("scalar") / f"_pixels{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    subprocess.run([*compiler(), "-shared", "-fPIC", "-O2", "-U__SSE2__", f"-I{include}", str(SOURCE), "-o", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    loader = importlib.machinery.ExtensionFileLoader("_pixels", str(out))
    spec = importlib.util.spec_from_file_location("_pixels", out, loader=loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.png_unfilter_into


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
        assert fast is not None and np.array_equal(fast, opencv(data)), (width, trial)


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
        assert fast is not None and np.array_equal(fast, opencv(data)), path.name
    assert len(calls) == len(paths)  # every image went through the scalar build
