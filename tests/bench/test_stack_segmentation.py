"""python -m bench.stack on segmentation end to end (real server processes): the service (two frontend processes),
the same service with one and with a short OpenMP spin, the naive server and the ceiling measured in turn, in a
non-default mask encoding, with the ratios, each server's CPU (the whole and its top process alone) and its
thread variables written to its JSON.
It replaced bench/segmentation.py, whose smoke test this was."""

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.slow  # starts four servers (one with two frontends): ~50-100 s on 2 shared CPU cores
def test_quick_segmentation_stack_writes_ratios(tmp_path):
    out = tmp_path / "stack.json"
    cmd = [sys.executable, "-m", "bench.stack", "--quick", "--tasks", "segmentation",
           "--peers", "service,service_one_frontend,service_short_spin,naive", "--frontend-processes", "2",
           "--mask-encoding", "rle", "--seg-input-size", "32", "--max-batch-size", "4", "--requests", "12",
           "--seconds", "1", "--rounds", "1", "--concurrency", "1,4", "--images", "2", "--serving-path-requests", "0",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["segmentation"] and result["options"]["mask_encoding"] == "rle"
    seg = result["tasks"]["segmentation"]
    assert seg["settings"]["server_config"]["max_batch_size"] == 4
    ceiling = seg["ceiling"]
    assert ceiling["img_per_s"] > 0 and ceiling["finish_p50_ms"] > 0 and ceiling["batch_size"] == 4
    assert set(seg["peers"]) == {"service", "service_one_frontend", "service_short_spin", "naive"}
    # each server's thread variables as its /proc shows them: only the short-spin peer's spin count differs
    spin = {name: peer["server_env"]["GOMP_SPINCOUNT"] for name, peer in seg["peers"].items()}
    inherited = os.environ.get("GOMP_SPINCOUNT")
    assert spin == {"service": inherited, "service_one_frontend": inherited, "service_short_spin": "10000",
                    "naive": inherited}  # fmt: skip
    assert seg["settings"]["server_config"]["frontend_processes"] == 2
    for name, peer in seg["peers"].items():
        assert [lv["concurrency"] for lv in peer["levels"]] == [1, 4], name
        for lv in peer["levels"]:
            assert lv["requests"] > 0 and lv["codes"] == {"OK": lv["requests"]}, (name, lv)
            assert lv["img_per_s"] > 0 and lv["p50_ms"] > 0, (name, lv)
            assert 0 < lv["server_top_cpu_ms_per_img"] <= lv["server_cpu_ms_per_img"], (name, lv)
    # the executor alone: the frontends decode and encode the masks (with one connection, one frontend takes them all)
    for lv in seg["peers"]["service"]["levels"]:
        assert lv["server_top_cpu_ms_per_img"] < lv["server_cpu_ms_per_img"], lv
    for level in ("c1", "c4"):
        assert seg["ratios"][level]["service_over_naive"] > 0 and seg["ratios"][level]["service_over_ceiling"] > 0
