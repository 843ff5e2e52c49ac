"""Model runtimes side by side in one run: the classification service (DenseNet-121 @224, and the Swin-T binary
model) and the segmentation service (U-Net @256) with `models.<name>.runtime` torch/float32 against OpenVINO
and ONNX Runtime in int8 and bfloat16, each its own service process, measured in turn at one concurrency, the
others paused; LitServe serving the float32 network is the anchor. Ratios are against the float32 torch service
of the same model; a variant that failed its load-time check (it then serves float32 torch) is marked so.

    python -m bench.runtimes [--quick] [--concurrency 32] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    API_KEY,
    ServerProcess,
    closed_loop,
    free_port,
    grpc_serving,
    http_ok,
    machine,
    nih_pngs,
    only_running,
    stage,
    stop_on_sigterm,
    write_result,
)
from bench._peers import (
    ClassificationTask,
    SegmentationTask,
    StackOptions,
    Task,
    default_model_instances,
    grpc_call,
    http_call,
    peer_process,
    service_process,
)

# (variant name, task, model key, extra model settings, runtime)
CLASSIFIER = "multiclass_classifier"
SWIN = "binary_classifier"
OV_INT8 = {"backend": "openvino", "precision": "int8"}
OV_BF16 = {"backend": "openvino", "precision": "bfloat16"}
ORT_INT8 = {"backend": "onnxruntime", "precision": "int8"}
UNET_DECODER = ["/net/decoder/", "/net/segmentation_head/"]  # exported node names of LogitsOf(smp.Unet)
OV_INT8_FLOAT_DECODER = {**OV_INT8, "int8_float_layers": UNET_DECODER}
UNET_TRAINED = {"checkpoint_path": "<pseudo-trained>"}  # filled in at run time (bench/pseudo_trained_unet.py)
VARIANTS: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    ("densenet torch/float32", "classification", CLASSIFIER, {}, {}),
    ("densenet openvino/int8", "classification", CLASSIFIER, {}, {"backend": "openvino", "precision": "int8"}),
    ("densenet onnxruntime/int8", "classification", CLASSIFIER, {}, {"backend": "onnxruntime", "precision": "int8"}),
    ("densenet openvino/bfloat16", "classification", CLASSIFIER, {}, {"backend": "openvino", "precision": "bfloat16"}),
    ("densenet openvino/float32", "classification", CLASSIFIER, {}, {"backend": "openvino", "precision": "float32"}),
    # the U-Net serves a checkpoint pseudo-trained at bench time: random-init masks are near-empty or speckled,
    # and their Dice moves with a few pixels whatever the runtime (bench/README.md, "Model runtimes")
    ("unet torch/float32", "segmentation", "segmentation", UNET_TRAINED, {}),
    ("unet openvino/int8", "segmentation", "segmentation", UNET_TRAINED, OV_INT8),
    # int8 encoder, float32 decoder and head: all-int8 misses the Dice bound on the clavicles (0.97)
    ("unet openvino/int8 float-decoder", "segmentation", "segmentation", UNET_TRAINED, OV_INT8_FLOAT_DECODER),
    ("unet openvino/bfloat16", "segmentation", "segmentation", UNET_TRAINED, OV_BF16),
    ("unet onnxruntime/int8", "segmentation", "segmentation", UNET_TRAINED, ORT_INT8),
    # the same runtimes on the random-init U-Net: only their load-time check is recorded (they fall back)
    ("unet-untrained openvino/int8", "segmentation", "segmentation", {}, OV_INT8),
    ("unet-untrained openvino/bfloat16", "segmentation", "segmentation", {}, OV_BF16),
    ("swin torch/float32", "classification", SWIN, {}, {}),
    ("swin openvino/int8", "classification", SWIN, {}, {"backend": "openvino", "precision": "int8"}),
    ("swin openvino/bfloat16", "classification", SWIN, {}, {"backend": "openvino", "precision": "bfloat16"}),
]  # fmt: skip
CHECK_ONLY = {"unet-untrained openvino/int8", "unet-untrained openvino/bfloat16"}  # started, checked, stopped
LITSERVE = {"densenet torch/float32": "litserve densenet float32", "unet torch/float32": "litserve unet float32"}
BASELINE = {"densenet": "densenet torch/float32", "unet": "unet torch/float32", "swin": "swin torch/float32"}


class _Classifier(ClassificationTask):
    def __init__(self, key: str) -> None:
        self.model_key = key


def _settings(
    task: Task, o: StackOptions, key: str, extra: dict[str, Any], runtime: dict[str, Any], cache: Path,
    checkpoint: Path | None,
) -> dict[str, Any]:  # fmt: skip
    data = task.settings(o)
    (section,) = data["models"].values()
    section = {**section, **extra}
    if extra is UNET_TRAINED:
        assert checkpoint is not None
        section.update(checkpoint_path=checkpoint.name, allow_untrained=False)
        data["models_path"] = str(checkpoint.parent)
    if key == SWIN:
        section = {k: v for k, v in section.items() if k != "model_type"} | {"model_type": "swin_transformer"}
        section["task"] = "binary_classification"
    if runtime:
        section["runtime"] = {**runtime, "cache_dir": str(cache)}
    data["models"] = {key: section}
    return data


async def _model_info(port: int, task: Task) -> dict[str, str]:
    import grpc

    from cxr_protos.classification.v1 import classification_service_pb2 as cpb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as cgrpc
    from cxr_protos.segmentation.v1 import segmentation_service_pb2 as spb
    from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as sgrpc

    md = (("x-api-key", API_KEY),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        if task.name == "classification":
            resp = await cgrpc.ClassificationServiceStub(ch).ListModels(cpb.ListModelsRequest(), metadata=md)
        else:
            resp = await sgrpc.SegmentationServiceStub(ch).ListModels(spb.ListModelsRequest(), metadata=md)
    (m,) = resp.models
    return {"backend": m.backend, "precision": m.precision, "runtime_note": m.runtime_note}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    o = StackOptions(max_batch_size=8, cpu_threads=1, model_instances=default_model_instances("cpu", 1))
    pngs = nih_pngs(16)
    wanted = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only.split(","))]
    results: dict[str, Any] = {}
    servers: dict[str, ServerProcess] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    cache = Path(args.cache_dir).resolve()
    ports: dict[str, int] = {}
    tasks: dict[str, Task] = {}
    checkpoint = None
    if any(v[3] is UNET_TRAINED for v in wanted):
        with stage("pseudo-train the U-Net (cached)"):
            checkpoint, results["unet_checkpoint"] = _pseudo_trained_unet(cache, o.seg_input_size)
            print(f"   {json.dumps(results['unet_checkpoint'])}", flush=True)
    try:
        for name, task_name, key, extra, runtime in wanted:  # one start at a time: exports do not compete
            task: Task = _Classifier(key) if task_name == "classification" else SegmentationTask()
            cfg = tmp / f"{name.replace(' ', '_').replace('/', '_')}.json"
            cfg.write_text(json.dumps(_settings(task, o, key, extra, runtime, cache, checkpoint)))
            ports[name], tasks[name] = free_port(), task
            with stage(f"start {name}"):
                server = service_process(task, cfg, ports[name])
                servers[name] = server
                ready_s = await server.wait_ready(lambda p=ports[name]: grpc_serving(p), timeout=900)
                info = await _model_info(ports[name], task)
                results[name] = {"ready_s": ready_s, "runtime_config": runtime, **info}
                results[name]["runtime_served"] = info["backend"] == runtime.get("backend", "torch")
                print(f"   {json.dumps(results[name])}", flush=True)
                if name in CHECK_ONLY:
                    servers.pop(name).stop()
                else:
                    server.pause()
            if name in LITSERVE and args.litserve:
                lit_name, lit_port = LITSERVE[name], free_port()
                with stage(f"start {lit_name}"):
                    lit = peer_process("litserve", task, cfg, lit_port)
                    servers[lit_name] = lit
                    await lit.wait_ready(lambda p=lit_port: http_ok(f"http://127.0.0.1:{p}/health"), timeout=600)
                    ports[lit_name], tasks[lit_name] = lit_port, task
                    results[lit_name] = {"backend": "torch", "precision": "float32"}
                    lit.pause()
        cells: dict[str, list[dict[str, Any]]] = {n: [] for n in servers}
        import aiohttp

        async with contextlib.AsyncExitStack() as stack:
            calls = {}
            http = await stack.enter_async_context(aiohttp.ClientSession())
            for name in servers:
                if name.startswith("litserve"):
                    calls[name] = http_call(http, f"http://127.0.0.1:{ports[name]}/predict",
                                            [json.dumps(tasks[name].rest_body(p)).encode() for p in pngs])  # fmt: skip
                else:
                    ch = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}"))
                    calls[name] = grpc_call(ch, tasks[name], pngs)
            names = list(servers)
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]  # rotating: load drifts hit all alike
                for name in order:
                    with only_running(servers.values(), [servers[name]]):
                        load = os.getloadavg()[0]
                        cpu_before = _cpu_seconds(servers[name])
                        cell = await closed_loop(
                            calls[name], args.concurrency, max_requests=args.requests, max_seconds=args.seconds,
                            warmup=1,
                        )  # fmt: skip
                        cell["server_cpu_s"] = round(_cpu_seconds(servers[name]) - cpu_before, 2)
                        cell["load_average_1m_before"] = round(load, 2)
                        cells[name].append(cell)
                        print(f"   round {r} {name}: {cell['img_per_s']} img/s {cell['codes']}", flush=True)
        for name, got in cells.items():
            ok = sum(c["requests"] for c in got)
            secs = sum(c["seconds"] for c in got)
            results[name]["img_per_s"] = round(ok / secs, 3) if secs else 0.0
            results[name]["by_round"] = [c["img_per_s"] for c in got]
            results[name]["codes"] = [c["codes"] for c in got]
            results[name]["load_average_1m_before"] = [c["load_average_1m_before"] for c in got]
            cpu = sum(c["server_cpu_s"] for c in got)  # includes the warm-up request: a slight undercount of img/cpu-s
            results[name]["img_per_server_cpu_s"] = round(ok / cpu, 3) if cpu else 0.0
            results[name]["by_round_img_per_server_cpu_s"] = [
                round(c["requests"] / c["server_cpu_s"], 3) if c["server_cpu_s"] else 0.0 for c in got
            ]
        for name, res in results.items():
            family = name.split()[1] if name.startswith("litserve") else name.split()[0]
            base = results.get(BASELINE.get(family, ""), {}).get("img_per_s")
            if base:
                res["ratio_vs_torch_float32"] = round(res["img_per_s"] / base, 3)
            base_cpu = results.get(BASELINE.get(family, ""), {}).get("img_per_server_cpu_s")
            if base_cpu and "img_per_server_cpu_s" in res:  # what a loaded host cannot skew: work per image
                res["cpu_efficiency_ratio_vs_torch_float32"] = round(res["img_per_server_cpu_s"] / base_cpu, 3)
    finally:
        for s in servers.values():
            s.stop()
    return results


def _cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU seconds of the server process and its children (LitServe's workers) so far."""
    import psutil

    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _pseudo_trained_unet(cache: Path, input_size: int) -> tuple[Path, dict[str, Any]]:
    """The U-Net checkpoint the segmentation variants serve, trained on the NIH images the check holds back none
    of (the default split's check images are left out), made once per cache key."""
    from dataclasses import asdict

    from bench.pseudo_trained_unet import PseudoTraining, train_checkpoint
    from cxr_serving.runtimes.calibration import split_images
    from cxr_serving.runtimes.config import RuntimeConfig, default_calibration_dir

    rc = RuntimeConfig()
    folder = default_calibration_dir()
    held_back = set(split_images(folder, rc.calibration_images, rc.check_images).check)
    images = sorted(p for p in folder.glob("*.png") if p not in held_back)
    spec = PseudoTraining(input_size=input_size)
    started = time.perf_counter()
    path = train_checkpoint(spec, images, cache / "pseudo-trained")
    return path, {
        "path": str(path),
        "made_or_reused_s": round(time.perf_counter() - started, 1),
        "training": asdict(spec),
        "training_images": len(images),
        "note": "random-init encoder and decoder trained briefly on pseudo-masks drawn by a classical method "
        "(bench/pseudo_trained_unet.py), not on anatomy: a stand-in for a trained checkpoint's confident, "
        "compact masks; never the check's held-back images",
    }


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 8 s (a smoke run)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget of one cell")
    ap.add_argument("--requests", type=int, default=2000, help="request budget of one cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of the variants to run")
    ap.add_argument("--no-litserve", dest="litserve", action="store_false", help="leave out the LitServe anchor")
    ap.add_argument("--out", type=Path, help="default bench/results/runtimes.json")
    ap.add_argument("--cache-dir", default="var/cache/bench-runtimes", help="export cache (reused across runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 8.0
    started = time.time()
    host = machine()
    results = asyncio.run(run(args))
    write_result(
        "runtimes",
        {
            "machine": host,
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            "wall_s": round(time.time() - started, 1),
            "conditions": {
                "concurrency": args.concurrency,
                "seconds_per_cell": args.seconds,
                "rounds": args.rounds,
                "max_batch_size": 8,
                "cpu_threads": 1,
                "model_instances": default_model_instances("cpu", 1),
                "images": "16 NIH PNGs (cxr14-sample), default calibration/check split",
                "weights": "DenseNet and Swin-T untrained (random-init); U-Net pseudo-trained (unet_checkpoint)",
            },
            "results": results,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
