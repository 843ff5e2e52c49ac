"""Serving-path CPU per image, for `bench.stack`: what the service spends on an image beyond the forward.

For one task, the real service runs a cheap model (the serving path then dominates its CPU): for
classification a timm MobileNetV3-Small 0.5 at the run's input size, for segmentation the run's U-Net at
64 px (masks still come back at the original 512 x 512). The same network runs in this process as the
ceiling: batched forwards on prepared tensors, the batch size the service uses, no decode, no RPC.

Each cell sends one input format (PNG, JPEG, DICOM uncompressed, DICOM JPEG baseline, 12-bit DICOM, all made
from the same NIH radiographs: `bench._common.nih_inputs`) and, for segmentation, one mask encoding (RLE, PNG),
at a concurrency that keeps the batches full (a long batch window). Cells and the ceiling take turns in
rotating rounds, so load from other processes hits them alike. From /proc: the server's CPU per answered
image in each cell, and this process's CPU per image in the ceiling's cells; their difference is the
serving-path CPU per image (decode, preprocessing, gRPC, event loop, hand-offs, postprocessing, mask
encoding and the response).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench._common import (
    INPUT_FORMATS,
    Recorder,
    drive_closed,
    free_port,
    grpc_serving,
    nih_inputs,
    nih_pngs,
    own_cpu_s,
    tree_cpu_s,
)
from bench._peers import StackOptions, Task, grpc_call, load_settings_file, service_process, task_named, write_settings

CHEAP_CLASSIFIER = {"architecture": "timm", "timm_name": "mobilenetv3_small_050"}
CHEAP_SEGMENTATION_INPUT = 64
TARGET_MS = {"classification": 2.5, "segmentation": 6.0}  # issue 23, target 1 (this 2-core CPU host)
BATCH_WINDOW_MS = 100.0  # long enough that batches fill: the ceiling runs full batches too
ENCODINGS = ("rle", "png")
BASELINE = "baseline:"  # cell-name prefix of the --serving-path-baseline service


def cheap_settings(task: Task, opts: StackOptions, folder: Path) -> Path:
    """The run's settings with the cheap model of `task` and a batch window that fills batches."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_settings(task, opts, folder)
    settings = json.loads(path.read_text())
    section = next(iter(settings["models"].values()))
    if task.name == "classification":
        section.pop("model_type", None)
        section.update(CHEAP_CLASSIFIER)
    else:
        section["input_size"] = CHEAP_SEGMENTATION_INPUT
    settings["server_config"]["max_batch_delay_ms"] = BATCH_WINDOW_MS
    path.write_text(json.dumps(settings))
    return path


def cells_of(task: Task) -> list[tuple[str, str | None]]:
    """(input format, mask encoding or None) of every cell of `task`."""
    if task.name == "segmentation":
        return [(fmt, enc) for fmt in INPUT_FORMATS for enc in ENCODINGS]
    return [(fmt, None) for fmt in INPUT_FORMATS]


def cell_name(fmt: str, encoding: str | None) -> str:
    return f"{fmt}/{encoding}" if encoding else fmt


def baseline_env(tree: Path) -> dict[str, str]:
    """PYTHONPATH that makes a service import the platform from `tree` (another checkout) instead of ours."""
    roots = sorted(str(p) for p in (*tree.glob("libs/*/src"), *tree.glob("services/*/src")))
    if not roots:
        raise SystemExit(f"--serving-path-baseline {tree}: no libs/*/src or services/*/src there")
    return {"PYTHONPATH": os.pathsep.join([*roots, str(tree)])}


async def measure(task_name: str, args: argparse.Namespace, opts: StackOptions, tmp: Path) -> dict[str, Any]:
    """Every cell of `task_name` and the ceiling, in rotating rounds; CPU ms per image and their differences.
    With `args.serving_path_baseline`, the baseline tree's service answers every cell too, in the same rounds."""
    import grpc

    from bench.stack import GRPC_OPTIONS, parallel_forwards

    task = task_named(task_name)
    config = cheap_settings(task, opts, tmp / f"serving-path-{task_name}")
    inputs = {fmt: nih_inputs(fmt, args.images) for fmt in INPUT_FORMATS}
    model = task.load(load_settings_file(str(config)))
    prepared = [task.prepare(model, p)[1] for p in nih_pngs(args.images)]
    batch = [prepared[i % len(prepared)] for i in range(opts.max_batch_size)]
    model.predict(batch)
    concurrency = 2 * opts.max_batch_size * max(1, opts.model_instances)
    per_cell = max(concurrency, args.serving_path_requests // args.rounds)
    baseline: Path | None = getattr(args, "serving_path_baseline", None)
    sides = ["", BASELINE] if baseline else [""]
    cell_names = [cell_name(*c) for c in cells_of(task)]
    names = [side + c for c in cell_names for side in sides] + ["ceiling"]
    cpu = {n: 0.0 for n in names}
    images = dict.fromkeys(names, 0)
    by_round: dict[str, list[float]] = {n: [] for n in names}
    codes: dict[str, dict[str, int]] = {}
    ports = {side: free_port() for side in sides}
    services = {"": service_process(task, config, ports[""])}
    if baseline:
        services[BASELINE] = service_process(task, config, ports[BASELINE], env=baseline_env(baseline))
    loads = [os.getloadavg()[0]]
    policies: dict[str, dict[str, int]] = {}
    try:
        for side, svc in services.items():
            await svc.wait_ready(lambda port=ports[side]: grpc_serving(port))  # type: ignore[misc]
        pids = {side: [svc.proc.pid] for side, svc in services.items() if svc.proc is not None}
        channels = {side: grpc.aio.insecure_channel(f"127.0.0.1:{ports[side]}", options=GRPC_OPTIONS) for side in sides}
        try:
            calls = {}
            for side in sides:
                for fmt, enc in cells_of(task):
                    cell_task = task_named(task_name, enc or "png")
                    calls[side + cell_name(fmt, enc)] = grpc_call(
                        channels[side], cell_task, inputs[fmt], content_type=INPUT_FORMATS[fmt]
                    )
            for call in calls.values():  # warm-up: every format's code path once, full batches once
                await drive_closed(call, concurrency, Recorder(), max_requests=concurrency, max_seconds=args.seconds)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    if name == "ceiling":
                        before = own_cpu_s()
                        done, _wall = parallel_forwards(model, batch, max(1, opts.model_instances), per_cell,
                                                        args.seconds / args.rounds, lambda: None)  # fmt: skip
                        spent = own_cpu_s() - before
                    else:
                        side = BASELINE if name.startswith(BASELINE) else ""
                        rec = Recorder()
                        before = tree_cpu_s(pids[side])
                        await drive_closed(calls[name], concurrency, rec, max_requests=per_cell,
                                           max_seconds=args.seconds / args.rounds)  # fmt: skip
                        spent = tree_cpu_s(pids[side]) - before
                        done = len(rec.ok)
                        for code, k in rec.codes().items():
                            codes.setdefault(name, {}).setdefault(code, 0)
                            codes[name][code] += k
                    cpu[name] += spent
                    images[name] += done
                    by_round[name].append(round(1000 * spent / done, 3) if done else float("nan"))
                loads.append(os.getloadavg()[0])
            policies = {side or "service": svc.thread_policies() for side, svc in services.items()}
        finally:
            for ch in channels.values():
                await ch.close(grace=None)
    finally:
        for svc in services.values():
            svc.stop()
        model.unload()
    ceiling_ms = 1000 * cpu["ceiling"] / images["ceiling"] if images["ceiling"] else None

    def cpu_ms(name: str) -> float | None:
        return 1000 * cpu[name] / images[name] if images[name] else None

    rows: dict[str, Any] = {}
    for fmt, enc in cells_of(task):
        name = cell_name(fmt, enc)
        server_ms = cpu_ms(name)
        serving = round(server_ms - ceiling_ms, 3) if server_ms is not None and ceiling_ms is not None else None
        paired = [round(s - c, 3) for s, c in zip(by_round[name], by_round["ceiling"], strict=True)]
        if baseline:
            base = cpu_ms(BASELINE + name)
            rows_base = {
                "baseline_images": images[BASELINE + name],
                "baseline_codes": codes.get(BASELINE + name, {}),
                "baseline_server_cpu_ms_per_img": round(base, 3) if base is not None else None,
                "baseline_serving_path_cpu_ms_per_img": (
                    round(base - ceiling_ms, 3) if base is not None and ceiling_ms is not None else None
                ),
                "baseline_serving_path_cpu_ms_per_img_by_round": [
                    round(b - c, 3) for b, c in zip(by_round[BASELINE + name], by_round["ceiling"], strict=True)
                ],
            }
        rows[name] = {
            "format": fmt,
            "mask_encoding": enc,
            "images": images[name],
            "codes": codes.get(name, {}),
            "server_cpu_ms_per_img": round(server_ms, 3) if server_ms is not None else None,
            "serving_path_cpu_ms_per_img": serving,
            "serving_path_cpu_ms_per_img_by_round": paired,
            "target_ms": TARGET_MS[task_name],
            "met": serving is not None and serving <= TARGET_MS[task_name],
            **(rows_base if baseline else {}),
        }
        print(f"   serving path {task_name:<14} {name:<13} server {rows[name]['server_cpu_ms_per_img']} ms/img"
              f" - ceiling {round(ceiling_ms or 0, 3)} = {serving} ms/img (rounds {paired})"
              + (f"; baseline {rows[name]['baseline_serving_path_cpu_ms_per_img']}" if baseline else ""),
              flush=True)  # fmt: skip
    model_desc = (
        f"timm {CHEAP_CLASSIFIER['timm_name']} @{opts.input_size}"
        if task_name == "classification"
        else f"U-Net {opts.encoder} @{CHEAP_SEGMENTATION_INPUT}"
    )
    return {
        "model": model_desc,
        "concurrency": concurrency,
        "max_batch_size": opts.max_batch_size,
        "max_batch_delay_ms": BATCH_WINDOW_MS,
        "ceiling_cpu_ms_per_img": round(ceiling_ms, 3) if ceiling_ms is not None else None,
        "ceiling_cpu_ms_per_img_by_round": by_round["ceiling"],
        "baseline": str(baseline) if baseline else None,
        "load_average_1m": {"min": min(loads), "max": max(loads), "mean": round(statistics.mean(loads), 2)},
        "server_thread_policies": policies,  # each service's threads per CPU scheduling policy, after the rounds
        "cells": rows,
    }
