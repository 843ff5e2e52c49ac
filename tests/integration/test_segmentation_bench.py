"""bench/segmentation.py --quick runs end to end (real server processes) and writes its JSON."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # starts two server processes: ~30-60 s on 2 shared CPU cores
def test_quick_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "segmentation.json"
    cmd = [sys.executable, "bench/segmentation.py", "--quick", "--input-size", "32", "--requests", "4",
           "--seconds", "1", "--concurrency", "1,4", "--images", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["raw_mask_work_ms_per_image"]) == {"none", "rle", "png"}
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 4]
    for lv in result["levels"]:
        assert lv["raw"]["images_per_s"] > 0 and lv["raw_batch1"]["batch_size"] == 1
        assert lv["service"]["requests"] > 0 and not lv["service"]["errors"]
        assert lv["naive"]["requests"] > 0 and not lv["naive"]["errors"]
    assert result["batching"]["naive"]["max_batch_size"] == 1
    assert set(result["service_by_encoding"]) == {"png", "rle", "none"}
    assert set(result["ratios"]["service_vs_naive"]) == {"1", "4"}
    assert "vs naive" in proc.stdout
