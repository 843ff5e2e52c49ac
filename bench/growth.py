"""How cost grows (`make bench-growth`): batch size, input image size, concurrent requests, start-up.

  1. throughput vs batch size: in-process batched forward, classification and segmentation,
     batch 1..16 (what the dynamic batcher can win on this device);
  2. throughput vs input image size: the classification service at concurrency 8 with the same
     radiographs re-encoded as 256, 512 and 1024 px PNGs, and the in-process decode+preprocess
     time per image at each size;
  3. memory vs concurrent requests: peak RSS of the classification and segmentation service
     processes at concurrency 1, 8, 32, 64 (1024 px PNGs) next to their idle RSS;
  4. start-up time to READY (gRPC health SERVING / gateway /status 200) for every service and
     the gateway, from process start.
Every measurement is bounded by a request count and seconds.

    .venv/bin/python -m bench.growth [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    PUBMEDQA,
    ServerProcess,
    closed_loop,
    free_port,
    grpc_serving,
    http_ok,
    machine,
    nih_pngs,
    resized_png,
    stage,
    stop_on_sigterm,
    write_result,
)
from bench._peers import (
    StackOptions,
    Task,
    gateway_process,
    grpc_call,
    load_settings_file,
    server_section,
    service_process,
    task_named,
    write_settings,
)
from bench.stack import GRPC_OPTIONS, set_torch_threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--image-sizes", default="256,512,1024")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--seconds", type=float, help="max seconds per measurement (10; quick 3)")
    ap.add_argument("--requests", type=int, help="max requests per measurement (200; quick 32)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.requests = args.requests or (32 if args.quick else 200)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.image_sizes = [int(x) for x in args.image_sizes.split(",")]
    args.levels = [int(x) for x in args.concurrency.split(",")]
    return args


def options(args: argparse.Namespace) -> StackOptions:
    q = args.quick
    return StackOptions(input_size=128 if q else 224, seg_input_size=128 if q else 256, cpu_threads=args.torch_threads)


# -- 1. batch size -------------------------------------------------------------------------------
def batch_sweep(task: Task, config: Path, pngs: list[bytes], args: argparse.Namespace) -> list[dict[str, Any]]:
    model = task.load(load_settings_file(str(config)))
    inputs = [task.prepare(model, p)[1] for p in pngs]
    rows = []
    for bs in args.batch_sizes:
        batch = [inputs[i % len(inputs)] for i in range(bs)]
        model.predict(batch)
        images, started = 0, time.perf_counter()
        while images < max(args.requests, 2 * bs) and time.perf_counter() - started < args.seconds:
            model.predict(batch)
            images += bs
        wall = time.perf_counter() - started
        rows.append(
            {
                "batch_size": bs,
                "img_per_s": round(images / wall, 3),
                "ms_per_batch": round(wall / images * bs * 1000, 2),
            }
        )
        print(f"   {task.name:<14} batch {bs:>3}: {rows[-1]['img_per_s']:8.2f} img/s", flush=True)
    model.unload()
    return rows


# -- 2./3. service sweeps ------------------------------------------------------------------------
async def service_sweeps(task: Task, config: Path, pngs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    port = free_port()
    svc = service_process(task, config, port)
    out: dict[str, Any] = {}
    try:
        out["startup_s"] = await svc.wait_ready(lambda: grpc_serving(port))
        await asyncio.sleep(1.0)
        out["idle_rss_mb"] = svc.rss_mb()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            if task.name == "classification":
                model = task.load(load_settings_file(str(config)))
                by_size = []
                for side in args.image_sizes:
                    images = [resized_png(p, side) for p in pngs]
                    t0 = time.perf_counter()
                    for png in images:
                        task.prepare(model, png)
                    prep_ms = (time.perf_counter() - t0) / len(images) * 1000
                    row = await closed_loop(grpc_call(ch, task, images), 8, max_requests=args.requests,
                                            max_seconds=args.seconds, warmup=1)  # fmt: skip
                    row.update(image_px=side, png_kb=round(sum(map(len, images)) / len(images) / 1024, 1),
                               decode_preprocess_ms=round(prep_ms, 2))  # fmt: skip
                    by_size.append(row)
                    print(f"   {side:>5} px: {row['img_per_s']:8.2f} img/s  p50 {row['p50_ms']} ms  "
                          f"decode+preprocess {prep_ms:.1f} ms", flush=True)  # fmt: skip
                model.unload()
                out["by_image_size"] = by_size
            by_conc = []
            for c in args.levels:
                async with svc.sampling_rss() as rss:
                    row = await closed_loop(grpc_call(ch, task, pngs), c, max_requests=max(args.requests, 2 * c),
                                            max_seconds=args.seconds)  # fmt: skip
                row.update(rss)
                by_conc.append(row)
                print(f"   {task.name:<14} c={c:<3} rss peak {row['rss_peak_mb']:7.0f} MB "
                      f"(idle {out['idle_rss_mb']:.0f})  {row['img_per_s']:.2f} img/s", flush=True)  # fmt: skip
            out["rss_by_concurrency"] = by_conc
    finally:
        svc.stop()
    return out


# -- 4. start-up of rag and the gateway ----------------------------------------------------------
def rag_settings(tmp: Path, passages: int = 20) -> Path:
    corpus = tmp / "corpus.jsonl"
    with (PUBMEDQA / "corpus.jsonl").open(encoding="utf-8") as src:
        corpus.write_text("".join(line for _, line in zip(range(passages), src, strict=False)), encoding="utf-8")
    cfg = {
        "models": {"rag": {"enabled": True, "vector_db_path": str(tmp / "chroma"), "documents_path": str(corpus)}},
        **server_section(StackOptions()),
    }
    path = tmp / "rag.json"
    path.write_text(json.dumps(cfg))
    return path


async def startup_others(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cxr_rag",
        "--config",
        str(rag_settings(tmp)),
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    rag = ServerProcess(cmd, name="rag service").start()
    try:
        out["rag"] = {"startup_s": await rag.wait_ready(lambda: grpc_serving(port)), "rss_mb": rag.rss_mb(),
                      "note": "20-passage PubMedQA corpus ingested at start, extractive (no LLM)"}  # fmt: skip
    except (RuntimeError, TimeoutError) as exc:
        out["rag"] = {"error": str(exc)[-500:]}
    finally:
        rag.stop()
    gw, ports = gateway_process({}, tmp)
    try:
        ready = await gw.wait_ready(lambda: http_ok(f"http://127.0.0.1:{ports.status}/status"))
        out["gateway"] = {"startup_s": ready, "rss_mb": gw.rss_mb()}
    finally:
        gw.stop()
    print(f"   {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    set_torch_threads(args.torch_threads)
    started = time.perf_counter()
    pngs = nih_pngs(8)
    result: dict[str, Any] = {"quick": args.quick, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name in ("classification", "segmentation"):
            task = task_named(name)
            config = write_settings(task, options(args), tmp)
            with stage(f"{name}: throughput vs batch size (in process)"):
                batches = batch_sweep(task, config, pngs, args)
            with stage(f"{name}: service, image size / concurrency sweeps"):
                sweeps = asyncio.run(service_sweeps(task, config, pngs, args))
            result[name] = {"settings": json.loads(config.read_text()), "by_batch_size": batches, **sweeps}
        with stage("start-up of rag and the gateway"):
            others = asyncio.run(startup_others(tmp))
    result["startup_s"] = {
        "classification": result["classification"]["startup_s"],
        "segmentation": result["segmentation"]["startup_s"],
        **{k: v.get("startup_s") for k, v in others.items()},
    }
    result["others"] = others
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("start-up to READY (s):", json.dumps(result["startup_s"]))
    write_result("growth-quick" if args.quick else "growth", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
