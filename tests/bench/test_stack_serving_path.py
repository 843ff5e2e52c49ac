"""bench/stack.py's serving-path CPU cells (bench/_serving_path.py) on a real service process: every input
format (and, for segmentation, mask encoding) answered, and the serving path reported as the server's CPU per
image less the ceiling's, against the issue-23 target; `--serving-path-only` runs that stage alone."""

import asyncio
import json

import pytest

from bench import _serving_path as serving_path
from bench import stack
from bench._common import INPUT_FORMATS


@pytest.mark.slow  # starts one service process and loads the cheap model in this one: ~20-40 s on 2 cores
@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_serving_path_cells_cover_every_format_and_subtract_the_ceiling(tmp_path, task_name, monkeypatch):
    # main() would set this process's torch threads and OMP_NUM_THREADS and a SIGTERM handler for the session
    monkeypatch.setattr(stack, "set_torch_threads", lambda n: None)
    monkeypatch.setattr(stack, "stop_on_sigterm", lambda: None)
    out = tmp_path / "serving-path.json"
    assert stack.main(["--quick", "--input-size", "64", "--max-batch-size", "2", "--model-instances", "1",
                       "--rounds", "1", "--seconds", "20", "--images", "2", "--serving-path-requests", "4",
                       "--serving-path-only", "--tasks", task_name, "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["benchmark"] == "stack-serving-path-only-quick" and "frontend_scaling" not in data
    assert list(data["tasks"]) == [task_name] and list(data["tasks"][task_name]) == ["serving_path"]  # nothing else ran
    result = data["tasks"][task_name]["serving_path"]
    encodings = serving_path.ENCODINGS if task_name == "segmentation" else (None,)
    expected = {serving_path.cell_name(fmt, enc) for fmt in INPUT_FORMATS for enc in encodings}
    assert set(result["cells"]) == expected
    ceiling = result["ceiling_cpu_ms_per_img"]
    assert ceiling is not None and ceiling > 0
    for name, cell in result["cells"].items():
        assert cell["images"] >= 4 and cell["codes"] == {"OK": cell["images"]}, (name, cell)
        assert cell["serving_path_cpu_ms_per_img"] == pytest.approx(cell["server_cpu_ms_per_img"] - ceiling, abs=2e-3)
        assert cell["met"] == (cell["serving_path_cpu_ms_per_img"] <= serving_path.TARGET_MS[task_name])
    assert result["load_average_1m"]["max"] >= result["load_average_1m"]["min"] >= 0
    # server_config.cpu_scheduling's default, read back from the kernel for every thread of the service
    (policies,) = result["server_thread_policies"].values()
    assert set(policies) == {"SCHED_BATCH"} and policies["SCHED_BATCH"] >= 4, policies


@pytest.mark.slow  # two service processes: ~30-60 s on 2 cores
def test_serving_path_baseline_service_answers_every_cell_in_the_same_rounds(tmp_path, repo_root):
    args = stack.parse_args(["--quick", "--input-size", "64", "--max-batch-size", "2", "--model-instances", "1",
                             "--rounds", "2", "--seconds", "20", "--images", "2", "--serving-path-requests", "8",
                             "--serving-path-baseline", str(repo_root)])  # fmt: skip
    result = asyncio.run(serving_path.measure("classification", args, stack.options(args), tmp_path))
    assert result["baseline"] == str(repo_root)
    ceiling = result["ceiling_cpu_ms_per_img"]
    for name, cell in result["cells"].items():
        assert cell["codes"] == {"OK": cell["images"]}, name
        assert cell["baseline_images"] >= 4 and cell["baseline_codes"] == {"OK": cell["baseline_images"]}, name
        base = cell["baseline_serving_path_cpu_ms_per_img"]
        assert base == pytest.approx(cell["baseline_server_cpu_ms_per_img"] - ceiling, abs=2e-3)
        assert len(cell["baseline_serving_path_cpu_ms_per_img_by_round"]) == 2
    with pytest.raises(SystemExit, match="no libs"):
        serving_path.baseline_env(tmp_path)


def test_serving_path_only_runs_no_scale_out_and_needs_requests():
    args = stack.parse_args(["--serving-path-only"])
    assert args.serving_path_only and args.frontend_requests == 0 and args.serving_path_requests == 320
    with pytest.raises(SystemExit):
        stack.parse_args(["--serving-path-only", "--serving-path-requests", "0"])
