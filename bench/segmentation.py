"""Segmentation benchmark: raw batched ceiling (no gRPC) vs the gRPC service vs a naive server.

  make bench-segmentation                 # bench/results/segmentation.json
  .venv/bin/python bench/segmentation.py --quick

Measured (every loop is bounded by a request count AND a time limit):
  - mask work per image: upsample logits to the original size + threshold, then encode (none/rle/png);
    raw forward + PNG masks in one thread.
  - per client concurrency level (1/8/32), back to back so a busy host skews all three alike:
      raw ceiling: the model in a worker process, preprocessed tensors, full batches of max_batch_size;
      service: `python -m cxr_segmentation` in its own process (dynamic batcher), real NIH PNGs, PNG masks;
      naive: the same service with max_batch_size=1 (one forward pass per request, no batching).
  - the service at the highest concurrency with RLE and NONE encodings.
Ratios printed and stored: service / raw ceiling and service / naive, per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cxr_protos.common.v1 import common_pb2  # noqa: E402
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb  # noqa: E402
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc  # noqa: E402

KEY = "bench-key-0123456789"
ENCODINGS = {"png": pb.MASK_ENCODING_PNG, "rle": pb.MASK_ENCODING_RLE, "none": pb.MASK_ENCODING_NONE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small and fast: a smoke run (CI)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, auto (default)")
    ap.add_argument("--input-size", type=int, help="network input (default 512 on GPU, 256 on CPU, 64 quick)")
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--batch-size", type=int, help="max_batch_size (default 32 on GPU, 8 on CPU)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrency levels")
    ap.add_argument("--requests", type=int, help="max requests per measurement (default 256, quick 16)")
    ap.add_argument("--seconds", type=float, help="max seconds per measurement (default 20, quick 3)")
    ap.add_argument("--images", type=int, default=8, help="distinct NIH images to cycle through")
    ap.add_argument(
        "--cpu-threads",
        type=int,
        help="performance.cpu_threads of every process; default 1 on CPU (three processes share the cores, and "
        "OpenMP teams on a busy host are many times slower), 0: torch's default",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "segmentation.json"))
    ap.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)  # internal: the raw-ceiling process
    args = ap.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.input_size = args.input_size or (64 if args.quick else 512 if cuda else 256)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.requests = args.requests or (16 if args.quick else 256)
    args.seconds = args.seconds or (3.0 if args.quick else 20.0)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.cpu_threads is None and not cuda:
        args.cpu_threads = 1
    return args


def nih_images(n: int) -> list[bytes]:
    shared = Path(os.environ.get("CXR_SHARED_DIR", REPO.parent / "shared"))
    paths = sorted((shared / "data" / "cxr14-sample" / "images").glob("*.png"))[:n]
    if not paths:
        raise SystemExit(f"no NIH images under {shared}/data/cxr14-sample/images")
    return [p.read_bytes() for p in paths]


def seg_section(args: argparse.Namespace) -> dict[str, Any]:
    return {"enabled": True, "allow_untrained": True, "input_size": args.input_size, "encoder": args.encoder}


def config(args: argparse.Namespace, batch_size: int, delay_ms: float) -> dict[str, Any]:
    return {
        "models": {"segmentation": seg_section(args)},
        "server_config": {
            "device": args.device,
            "max_batch_size": batch_size,
            "max_batch_delay_ms": delay_ms,
            "max_queue_size": 1024,
            "num_workers": max(2, min(8, os.cpu_count() or 2)),
            "log_level": "WARNING",
        },
        "performance": {"use_amp": args.device == "cuda", "warmup_batches": 2}
        | ({"cpu_threads": args.cpu_threads} if args.cpu_threads else {}),
        "security": {"enable_authentication": True, "api_keys": [KEY]},
        "monitoring": {"enable_metrics": False, "log_json": True},
    }


# --- raw ceiling: no gRPC, in its own process like the servers ------------------------------------
class RawRunner:
    """The served model, fed preprocessed tensors in full batches (runs inside `--raw-worker`)."""

    def __init__(self, args: argparse.Namespace, images: list[bytes]) -> None:
        from cxr_segmentation.service import build_model
        from cxr_serving.images import decode_image
        from cxr_serving.settings import Settings

        self.args = args
        self.model = build_model(Settings.model_validate(config(args, args.batch_size, 0)))
        self.model.load()
        self.decoded = [decode_image(b) for b in images]
        self.tensors = [self.model.preprocess(d.pixels) for d in self.decoded]
        for _ in range(3):  # warm both batch shapes (allocator, oneDNN/cuDNN kernels)
            self.model.predict(self.tensors[:1] * args.batch_size)
            self.model.predict(self.tensors[:1])

    def rate(self, mask_encoding: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """Images/s of batched forward passes (+ mask work for every image when mask_encoding is set)."""
        import torch

        from cxr_segmentation.masks import encode_png, encode_rle, logits_to_masks

        bs, done, started = batch_size or self.args.batch_size, 0, time.perf_counter()
        while done < self.args.requests and time.perf_counter() - started < self.args.seconds:
            batch = [self.tensors[(done + k) % len(self.tensors)] for k in range(bs)]
            out = self.model.predict(batch)
            if self.args.device == "cuda":
                torch.cuda.synchronize()
            for j, logits in enumerate(out if mask_encoding else ()):
                img = self.decoded[(done + j) % len(self.decoded)]
                for m in logits_to_masks(logits, (img.height, img.width), 0.5):
                    if mask_encoding == "png":
                        encode_png(m)
                    elif mask_encoding == "rle":
                        encode_rle(m)
            done += bs
        elapsed = time.perf_counter() - started
        return {"images_per_s": done / elapsed, "images": done, "seconds": elapsed, "batch_size": bs}

    def mask_work_ms(self) -> dict[str, float]:
        """Per image: upsample logits to the original size + threshold, then encode (none/rle/png)."""
        from cxr_segmentation.masks import encode_png, encode_rle, logits_to_masks

        logits, img = self.model.predict(self.tensors[:1])[0], self.decoded[0]
        out: dict[str, float] = {}
        for enc in ("none", "rle", "png"):
            reps, t0 = 0, time.perf_counter()
            while reps < 50 and time.perf_counter() - t0 < min(self.args.seconds, 5):
                for m in logits_to_masks(logits, (img.height, img.width), 0.5):
                    if enc == "png":
                        encode_png(m)
                    elif enc == "rle":
                        encode_rle(m)
                reps += 1
            out[enc] = (time.perf_counter() - t0) / reps * 1000
        return out


# --- phases 2 and 3: gRPC service in its own process --------------------------------------------
class ServerProcess:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(self.cfg, self._file)
        self._file.close()
        env = {**os.environ, "CXR_CONFIG_PATH": self._file.name}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cxr_segmentation", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self._file.name)

    async def wait_ready(self, stub: pb_grpc.SegmentationServiceStub, image: bytes, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
                raise SystemExit(f"segmentation server exited: {err}")
            try:
                await stub.SegmentImage(request(image, "none"), metadata=(("x-api-key", KEY),), timeout=30)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                await asyncio.sleep(0.5)
        raise SystemExit("segmentation server did not become ready")


def request(image: bytes, encoding: str) -> pb.SegmentImageRequest:
    return pb.SegmentImageRequest(
        image=common_pb2.Image(data=image, content_type="image/png"), mask_encoding=ENCODINGS[encoding]
    )


async def load(
    stub: pb_grpc.SegmentationServiceStub,
    images: list[bytes],
    concurrency: int,
    encoding: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    budget = max(args.requests, concurrency)
    counter = iter(range(budget))
    started = time.perf_counter()
    stop_at = started + args.seconds

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > stop_at:
                return
            t0 = time.perf_counter()
            try:
                await stub.SegmentImage(
                    request(images[i % len(images)], encoding), metadata=(("x-api-key", KEY),), timeout=120
                )
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "encoding": encoding,
        "requests": len(lat),
        "errors": errors,
        "seconds": elapsed,
        "images_per_s": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": statistics.median(lat) * 1000 if lat else None,
        "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000 if lat else None,
    }


def raw_worker(args: argparse.Namespace, images: list[bytes]) -> int:
    """Line protocol on stdin/stdout: 'forward' | 'forward1' | 'png' | 'rle' | 'mask_ms' -> one JSON line each."""
    import concurrent.futures

    # forward passes run on one worker thread, as the service's batcher runs them
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raw")
    runner = worker.submit(RawRunner, args, images).result()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "mask_ms":
            out: Any = worker.submit(runner.mask_work_ms).result()
        elif cmd == "forward1":
            out = worker.submit(runner.rate, None, 1).result()
        elif cmd in ("forward", "png", "rle"):
            out = worker.submit(runner.rate, None if cmd == "forward" else cmd).result()
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    worker.shutdown()
    return 0


class RawProcess:
    """The raw ceiling in a separate process, so that it, the service and the naive server are all
    measured as processes alike (none shares an interpreter with the benchmark's gRPC clients)."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--raw-worker", "--device", args.device,
               "--input-size", str(args.input_size), "--encoder", args.encoder, "--batch-size", str(args.batch_size),
               "--requests", str(args.requests), "--seconds", str(args.seconds),
               "--images", str(args.images)]  # fmt: skip
        if args.cpu_threads:
            cmd += ["--cpu-threads", str(args.cpu_threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("raw-ceiling worker failed to start")

    def call(self, cmd: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def measure_all(args: argparse.Namespace, images: list[bytes], raw: RawProcess) -> dict[str, Any]:
    """Both servers run side by side (idle when not measured); per concurrency level the raw ceiling,
    the service and the naive server are measured back to back, so a busy host skews all three alike."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with (
        ServerProcess(config(args, args.batch_size, 5.0)) as svc,
        ServerProcess(config(args, 1, 0.0)) as naive,
    ):
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}", options=options) as svc_ch,
            grpc.aio.insecure_channel(f"127.0.0.1:{naive.port}", options=options) as naive_ch,
        ):
            svc_stub, naive_stub = pb_grpc.SegmentationServiceStub(svc_ch), pb_grpc.SegmentationServiceStub(naive_ch)
            for server, stub in ((svc, svc_stub), (naive, naive_stub)):
                await server.wait_ready(stub, images[0])
                for _ in range(2):  # warm the path end to end
                    await stub.SegmentImage(request(images[0], "png"), metadata=(("x-api-key", KEY),))
            levels = []
            for c in args.levels:
                row = {
                    "concurrency": c,
                    "raw": raw.call("forward"),
                    "raw_batch1": raw.call("forward1"),
                    "service": await load(svc_stub, images, c, "png", args),
                    "naive": await load(naive_stub, images, c, "png", args),
                }
                levels.append(row)
                print(format_row(row), flush=True)
            top = max(args.levels)
            encodings = {e: await load(svc_stub, images, top, e, args) for e in ("rle", "none")}
            encodings["png"] = next(r["service"] for r in levels if r["concurrency"] == top)
    return {"levels": levels, "encodings": encodings}


HEAD = ("conc", "raw img/s", "raw b=1", "service img/s", "p50 ms", "p95 ms", "naive img/s", "vs raw", "vs naive")
WIDTHS = (5, 10, 8, 14, 9, 9, 12, 7, 9)


def ratios(row: dict[str, Any]) -> tuple[float, float]:
    """service / raw ceiling (the better of batch max_batch_size and batch 1), service / naive."""
    s, n = row["service"]["images_per_s"], row["naive"]["images_per_s"]
    r = max(row["raw"]["images_per_s"], row["raw_batch1"]["images_per_s"])
    return (s / r if r else 0.0, s / n if n else 0.0)


def format_row(row: dict[str, Any]) -> str:
    s = row["service"]
    vs_raw, vs_naive = ratios(row)
    values = (
        row["concurrency"],
        f"{row['raw']['images_per_s']:.2f}",
        f"{row['raw_batch1']['images_per_s']:.2f}",
        f"{s['images_per_s']:.2f}",
        f"{s['p50_ms'] or 0:.0f}",
        f"{s['p95_ms'] or 0:.0f}",
        f"{row['naive']['images_per_s']:.2f}",
        f"{vs_raw:.2f}",
        f"{vs_naive:.2f}",
    )
    return " ".join(f"{v:>{w}}" for v, w in zip(values, WIDTHS, strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = nih_images(args.images)
    if args.raw_worker:
        return raw_worker(args, images)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"segmentation bench: device={args.device} input={args.input_size} encoder={args.encoder} "
        f"batch={args.batch_size} levels={args.levels} (<= {args.requests} requests / {args.seconds:.0f} s each)",
        flush=True,
    )
    raw = RawProcess(args)
    mask_ms = raw.call("mask_ms")
    with_png = raw.call("png")
    print(
        "mask work ms/img (upsample+threshold, then encode): " + ", ".join(f"{k}={v:.1f}" for k, v in mask_ms.items())
    )
    print(" ".join(f"{h:>{w}}" for h, w in zip(HEAD, WIDTHS, strict=True)), flush=True)
    measured = asyncio.run(measure_all(args, images, raw))
    raw.close()
    enc = measured["encodings"]
    print(
        f"service at concurrency {max(args.levels)} by mask encoding (img/s): "
        + ", ".join(f"{k}={v['images_per_s']:.2f}" for k, v in enc.items())
        + f"; raw forward+PNG masks {with_png['images_per_s']:.2f} img/s"
    )
    import torch

    result = {
        "benchmark": "segmentation",
        "quick": args.quick,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        # other processes on the host skew CPU numbers: the 1-minute load average before and after
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "model": {"architecture": "Unet", "encoder": args.encoder, "input_size": args.input_size, "untrained": True},
        "images": len(images),
        "limits": {"requests": args.requests, "seconds": args.seconds},
        "cpu_threads": args.cpu_threads,
        "batching": {
            "service": {"max_batch_size": args.batch_size, "max_batch_delay_ms": 5.0},
            "naive": {"max_batch_size": 1, "max_batch_delay_ms": 0.0},
        },
        "raw_mask_work_ms_per_image": mask_ms,
        "raw_forward_plus_png_masks": with_png,
        "levels": measured["levels"],
        "service_by_encoding": measured["encodings"],
        "ratios": {
            "service_vs_raw_forward": {str(r["concurrency"]): ratios(r)[0] for r in measured["levels"]},
            "service_vs_naive": {str(r["concurrency"]): ratios(r)[1] for r in measured["levels"]},
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
