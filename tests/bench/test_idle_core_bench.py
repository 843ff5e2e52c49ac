"""bench/idle_core.py: the same work back to back, after an idle spell and after a busy one, in turns."""

import json
import time

import torch

from bench import idle_core


def test_each_gap_precedes_its_own_cells_and_the_ratios_are_the_p50s():
    gap_s, calls = 0.02, 6
    since_last: list[float] = []  # per call: time since the previous call ended
    last_end = [time.perf_counter()]

    def fn(_i: int) -> None:
        since_last.append(time.perf_counter() - last_end[0])
        last_end[0] = time.perf_counter()

    rows = idle_core.measure({"w": fn}, calls=calls, gap_s=gap_s)
    expected = [g for i in range(calls) for g in idle_core.GAPS[i % 3 :] + idle_core.GAPS[: i % 3]]
    measured = since_last[1:]  # the first call is the warm-up
    assert len(measured) == len(expected) == 18
    for gap, waited in zip(expected, measured, strict=True):
        if gap == "none":
            assert waited < gap_s, (gap, waited)  # right after the previous cell's call
        else:
            assert waited >= gap_s, (gap, waited)
    row = rows["w"]
    for g in ("sleep", "spin"):
        assert row[f"{g}_over_none_wall"] == round(row[g]["wall_p50_ms"] / row["none"]["wall_p50_ms"], 3)
        assert row[f"{g}_over_none_cpu"] == round(row[g]["cpu_p50_ms"] / row["none"]["cpu_p50_ms"], 3)


def test_quick_run_writes_every_workload_and_gap(tmp_path):
    out = tmp_path / "idle_core.json"
    threads = torch.get_num_threads()
    try:
        assert idle_core.main(["--quick", "--calls", "3", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main runs the workloads on one torch thread, as the service's cells
    data = json.loads(out.read_text())
    assert data["benchmark"] == "idle_core" and data["gap_ms"] == 10.0 and data["calls"] == 3
    assert set(data["workloads"]) == {"png_decode_preprocess", "numpy_2mb", "python"}
    for row in data["workloads"].values():
        assert all(row[g]["wall_p50_ms"] > 0 for g in idle_core.GAPS)
        assert row["sleep_over_none_wall"] > 0 and row["spin_over_none_cpu"] > 0
