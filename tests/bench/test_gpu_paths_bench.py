"""bench/gpu/gpu_paths.py: every variant loads through the services' own code and is compared with the first,
in one process (on CPU here: the same script runs the GPU variants on a GPU machine)."""

import json
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow  # two small networks, two variants each: ~15 s on 2 cores
def test_variants_side_by_side_with_ratios_and_deviation(tmp_path):
    out = tmp_path / "gpu_paths.json"
    cmd = [sys.executable, "-m", "bench.gpu.gpu_paths", "--device", "cpu", "--quick", "--models",
           "densenet121,unet_resnet34", "--variants", "eager,default", "--images", "2", "--input-size", "64",
           "--seg-input-size", "64", "--seconds", "0.2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["config"]["device"] == "cpu" and data["variants"]["eager"]["trace_models"] is False
    for model in ("densenet121", "unet_resnet34"):
        eager, default = data["results"][model]["eager"], data["results"][model]["default"]
        assert eager["img_per_s"] > 0 and eager["img_per_s_vs_first"] == 1.0
        assert default["img_per_s_vs_first"] == pytest.approx(default["img_per_s"] / eager["img_per_s"], rel=0.01)
        # the platform's CPU default (fold + trace) answers like the eager network
        assert "deviation_from_first" not in eager and default["deviation_from_first"] < 1e-4
        assert default["precision"] == "float32" and default["load_s"] >= 0 and default["batch1_p50_ms"] > 0
    assert "densenet121    default" in proc.stdout


def test_unknown_variant_is_refused_with_the_choices():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.gpu_paths", "--device", "cpu", "--variants", "amp_cl"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "unknown variants for cpu: ['amp_cl']" in proc.stderr
