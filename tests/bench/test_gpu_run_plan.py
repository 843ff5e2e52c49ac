"""bench/gpu/run.sh is run only on a lent GPU, where a wrong option would cost the whole call: its planned
steps are checked here against the benchmarks' own argument parsers, and their limits against the 8 minutes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bench import frontends, host_fingerprint, stack
from bench.gpu import gpu_paths

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {
    "bench.stack": stack.parse_args,
    "bench.gpu.gpu_paths": gpu_paths.parse_args,
    "bench.frontends": frontends.parse_args,
    "bench.host_fingerprint": host_fingerprint.parse_args,
}


def planned_steps(
    device: str, tmp_path: Path, script: str = "bench/gpu/run.sh", **extra: str
) -> list[tuple[str, int, list[str]]]:
    env = {**os.environ, "DRY": "1", "DEVICE": device, "OUT": str(tmp_path), "WHEELS": "none", "PY": "python", **extra}
    out = subprocess.run(
        ["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    steps = []
    for line in out.splitlines():
        if line.startswith("DRY "):
            head, _, command = line.partition(":")
            _, name, limit = head.split()
            steps.append((name, int(limit), shlex.split(command)))
    return steps


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_planned_step_parses_and_the_call_fits_eight_minutes(device: str, tmp_path: Path) -> None:
    steps = planned_steps(device, tmp_path)
    names = [name for name, _, _ in steps]
    assert names[:3] == ["host_fingerprint", "i23_classification", "i23_segmentation"]
    assert ("gpu_tensorrt" in names) == (device == "cuda")
    assert sum(limit for _, limit, _ in steps) <= 8 * 60 - 20
    for name, _, argv in steps:
        assert argv[:2] == ["python", "-m"], name
        args = PARSERS[argv[2]](argv[3:])  # an unknown option or a bad value exits here
        assert str(args.out).startswith(str(tmp_path)), name
    if device == "cuda":  # issue 24: TensorRT float16 and int8 beside the CUDA-graphs float path
        (trt,) = [gpu_paths.parse_args(argv[3:]) for name, _, argv in steps if name == "gpu_tensorrt"]
        assert list(trt.variant_table) == ["amp_cl_graphs", "trt_fp16", "trt_int8"]
    classification = stack.parse_args(steps[1][2][3:])
    assert "service_one_frontend" in classification.peers and "service_short_spin" in classification.peers
    if device == "cuda":
        assert classification.frontend_counts == (1, 2, 4, 8)
        assert classification.levels == [1, 64]
        assert classification.channels >= 8


def test_gpu_tests_opt_in_runs_the_cuda_tests_after_the_measurement(tmp_path: Path) -> None:
    """GPU_TESTS=1 adds one pytest step (tests/gpu, two frontends on CUDA among them) after the two measurements
    and before the TensorRT rows; without it the plan above is unchanged."""
    steps = planned_steps("cuda", tmp_path, GPU_TESTS="1", SESSION_S="540")
    assert [name for name, _, _ in steps] == [
        "host_fingerprint", "i23_classification", "i23_segmentation", "gpu_tests", "gpu_tensorrt"
    ]  # fmt: skip
    (argv,) = [argv for name, _, argv in steps if name == "gpu_tests"]
    assert argv[:3] == ["python", "-m", "pytest"] and "gpu" in argv
    assert "tests/gpu" in argv
    assert "gpu_tests" not in [name for name, _, _ in planned_steps("cuda", tmp_path)]


def test_the_frontends_probe_parses_and_fits_its_make_target(tmp_path: Path) -> None:
    """PLAN=frontends-probe (make bench-gpu-probe): every step parses, the limits fit the target's SESSION_S, the
    DenseNet step's service cells last long enough for py-spy's recording, and on CPU the plan refuses."""
    session_s = int(re.search(r"PLAN=frontends-probe SESSION_S=(\d+)", (ROOT / "Makefile").read_text())[1])
    session = "bench/gpu/gpu_session.sh"
    steps = planned_steps("cuda", tmp_path, session, PLAN="frontends-probe", SESSION_S=str(session_s))
    assert [name for name, _, _ in steps] == ["host_fingerprint", "probe_scaling", "probe_densenet"]
    assert sum(limit for _, limit, _ in steps) <= session_s - 10 - 60  # 60 s for the prelude (build, imports)
    parsed = {name: PARSERS[argv[2]](argv[3:]) for name, _, argv in steps}
    for name, args in parsed.items():
        assert getattr(args, "device", "cuda") == "cuda" and str(args.out).startswith(str(tmp_path)), name
    assert parsed["probe_scaling"].frontend_counts == (1, 8)
    densenet = parsed["probe_densenet"]
    assert densenet.frontend_processes is None  # the platform's default
    assert densenet.levels == [64]
    script = (ROOT / session).read_text()
    spy = re.search(r"timeout (\d+) \$PY -m bench.gpu.pyspy_executor .*?--seconds (\d+) --native-seconds (\d+)", script,
                    re.S)  # fmt: skip
    recording_s = float(spy[2]) + float(spy[3])
    (densenet_limit,) = [limit for name, limit, _ in steps if name == "probe_densenet"]
    assert int(spy[1]) <= densenet_limit  # the background recorder ends within the step it samples
    # the service is measured for seconds/rounds per round, capped at requests/rounds answers (at 3,000 img/s)
    per_round_s = min(densenet.seconds / densenet.rounds, densenet.requests / densenet.rounds / 3000)
    assert per_round_s >= recording_s + 2  # both records fit in one service cell, after the trigger's second
    env = {**os.environ, "DRY": "1", "DEVICE": "cpu", "OUT": str(tmp_path), "WHEELS": "none", "PLAN": "frontends-probe"}
    refused = subprocess.run(["bash", session], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2 and "DRY" not in refused.stdout


def test_the_int8_variant_calibrates_and_checks_on_the_images_the_gpu_machine_gets(tmp_path: Path) -> None:
    """trt_int8 is a valid tensorrt/int8 runtime whose check and calibration images together fit in what
    _gpu_wheels ships (an int8 that asked for more would fall back for want of images, not measure)."""
    from bench.gpu._gpu_wheels import GPU_IMAGES

    args = gpu_paths.parse_args(["--device", "cuda", "--variants", "trt_fp16,trt_int8", "--out", str(tmp_path)])
    int8 = gpu_paths.settings_for("densenet121", args.variant_table["trt_int8"], args).models
    runtime = int8["multiclass_classifier"]["runtime"]
    assert (runtime["backend"], runtime["precision"]) == ("tensorrt", "int8")
    assert runtime["check_images"] + runtime["calibration_images"] <= GPU_IMAGES
    fp16 = gpu_paths.settings_for("densenet121", args.variant_table["trt_fp16"], args).models
    assert fp16["multiclass_classifier"]["runtime"]["check_images"] == GPU_IMAGES
