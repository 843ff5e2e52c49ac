"""bench/idle_core.py: the same work back to back, after an idle spell and after a busy one, in turns."""

import json
import time

from bench import idle_core


def test_each_gap_precedes_its_cells_and_the_ratios_are_the_p50s():
    starts: list[tuple[float, float]] = []  # (time since the previous call ended, this call's start)
    last_end = [time.perf_counter()]

    def fn(_i: int) -> None:
        now = time.perf_counter()
        starts.append((now - last_end[0], now))
        last_end[0] = time.perf_counter()

    rows = idle_core.measure({"w": fn}, calls=6, gap_s=0.02)
    gaps = [g for g, _ in starts[1:]]  # the first call is the warm-up
    assert len(gaps) == 18
    assert sum(g >= 0.02 for g in gaps) == 12  # sleep and spin cells, each after its 20 ms
    assert sum(g < 0.005 for g in gaps) == 6  # back to back
    row = rows["w"]
    for g in ("sleep", "spin"):
        assert row[f"{g}_over_none_wall"] == round(row[g]["wall_p50_ms"] / row["none"]["wall_p50_ms"], 3)
        assert row[f"{g}_over_none_cpu"] == round(row[g]["cpu_p50_ms"] / row["none"]["cpu_p50_ms"], 3)


def test_quick_run_writes_every_workload_and_gap(tmp_path):
    out = tmp_path / "idle_core.json"
    assert idle_core.main(["--quick", "--calls", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "idle_core" and data["gap_ms"] == 10.0 and data["calls"] == 3
    assert set(data["workloads"]) == {"png_decode_preprocess", "numpy_2mb", "python"}
    for row in data["workloads"].values():
        assert all(row[g]["wall_p50_ms"] > 0 for g in idle_core.GAPS)
        assert row["sleep_over_none_wall"] > 0 and row["spin_over_none_cpu"] > 0
