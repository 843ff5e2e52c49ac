"""python -m bench.dicom_node runs end to end at a tiny size (real services, node and Orthanc) and writes its JSON,
with the CPUs shared or split between the models and the rest."""

import json
import os
import subprocess
import sys

import pytest

from tests.support.orthanc import require
from tests.support.paths import REPO


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["shared", "split"])
def test_quick_dicom_node_benchmark(tmp_path, placement):
    require()
    allowed = sorted(os.sched_getaffinity(0))
    if placement == "split" and len(allowed) < 2:
        pytest.skip("split needs 2 allowed CPUs")
    out = tmp_path / "dicom_node.json"
    cmd = [sys.executable, "-m", "bench.dicom_node", "--quick", "--direct-studies", "2", "--open-studies", "2",
           "--rate", "2", "--studies", "3", "--result-timeout", "240", "--placement", placement,
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "dicom_node" and result["all_completed"] is True
    assert result["direct_c1"]["studies"] == 2 and result["direct_c1"]["p50_ms"] > 0
    open_loop = result["open_loop"]
    assert open_loop["studies"] == open_loop["sr_in_orthanc"] == open_loop["completed"] == 2
    assert 0 < open_loop["ttr_p50_ms"] <= open_loop["ttr_p99_ms"]
    saturation = result["saturation"]
    [cell] = saturation["rounds"]
    assert cell["node"]["studies"] == cell["node"]["sr_in_orthanc"] == cell["node"]["completed"] == 3
    assert cell["direct"]["studies"] == 3 and cell["direct"]["concurrency"] == result["config"]["workers"]
    assert saturation["overhead"] == pytest.approx(
        saturation["node_s_per_study"] / saturation["direct_s_per_study"], rel=0.01
    )
    assert saturation["target"] == 1.15 and isinstance(saturation["within_target"], bool)
    assert set(cell["node"]["cpu_s_per_study"]) == {"classification", "segmentation", "dicom", "orthanc"}
    assert_placement(result, placement, allowed)


def assert_placement(result, placement, allowed):
    """Every process of every tree and every thread of the bench read back on its set, right after start and at
    the end; split: the models on the first half of the CPUs, the node, Orthanc and the bench on the rest."""
    half = len(allowed) - len(allowed) // 2
    models, rest = (allowed[:half], allowed[half:]) if placement == "split" else (allowed, allowed)
    record = result["placement"]
    assert result["config"]["placement"] == record["mode"] == placement and record["held"] is True
    assert (record["allowed_cpus"], record["model_cpus"], record["node_cpus"]) == (allowed, models, rest)
    assert result["config"]["model_instances"] == (len(models) if placement == "split" else os.cpu_count())
    for when in ("applied", "at_end"):
        assert set(record[when]) == {"classification", "segmentation", "dicom", "orthanc", "bench"}
        for name, back in record[when].items():
            expected = models if name in ("classification", "segmentation") else rest
            assert back["expected"] == expected and back["held"] is True, (when, name, back)
            assert back["pids"] and all(cpus == expected for cpus in back["pids"].values()), (when, name, back)
            assert back["threads"] == back["threads_on_set"] >= len(back["pids"]), (when, name, back)
