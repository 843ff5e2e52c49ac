"""bench/latency_c1.py end to end on a real classification service at 128 px: both phases answer every call,
the service's access log gives a server time for each, and the result records the service's threads per CPU
scheduling policy as the kernel reports them (server_config.cpu_scheduling's default, batch); each side's
inference is reported apart, within the call that holds it."""

from __future__ import annotations

import asyncio

import pytest

from bench import latency_c1
from bench._peers import task_named


@pytest.mark.slow  # one service process and the model in this one: ~15-30 s on 2 cores
def test_both_phases_are_measured_and_the_scheduling_policy_is_recorded(tmp_path):
    args = latency_c1.parse_args(["--quick", "--rounds", "6", "--load-seconds", "1", "--seconds", "60"])
    row = asyncio.run(latency_c1.measure(task_named("classification"), args, tmp_path))
    for phase in (row, row["after_load"]):
        assert phase["rounds"] == 6 and phase["server_calls_logged"] == 6, phase
        assert phase["added_p50_ms"] == pytest.approx(phase["service_p50_ms"] - phase["in_process_p50_ms"], abs=2e-3)
        inference = phase["inference_p50_ms"]
        # per call, inference <= the time that holds it, so the same holds for the medians
        assert 0 < inference["service"] <= phase["server_p50_ms"], phase
        assert 0 < inference["in_process"] <= phase["in_process_p50_ms"], phase
        assert isinstance(phase["added_besides_inference_paired_p50_ms"], float), phase  # every call paired
    policies = row["server_thread_policies"]
    assert set(policies) == {"SCHED_BATCH"} and policies["SCHED_BATCH"] >= 4, policies
