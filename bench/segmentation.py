"""Segmentation benchmark: raw in-process ceiling vs the gRPC service vs a naive server.

  make bench-segmentation                 # bench/results/segmentation.json
  .venv/bin/python bench/segmentation.py --quick

Phases (every loop is bounded by a request count AND a time limit):
  1. raw ceiling: preprocessed tensors, batched forward passes of `max_batch_size`, no gRPC, no
     decode; then the same forward plus per-image mask work (upsample logits to the original size,
     threshold, encode) to show what mask encoding costs; per-encoding cost in ms/image.
  2. service: `python -m cxr_segmentation` in its own process (dynamic batcher on), gRPC clients
     at concurrency 1/8/32 sending real NIH PNGs, PNG masks; at the highest concurrency also RLE and
     NONE encodings.
  3. naive: the same service with max_batch_size=1 (one forward pass per request, no batching).
Ratios printed and stored: service / raw ceiling, service / naive, per concurrency.
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
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "segmentation.json"))
    args = ap.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.input_size = args.input_size or (64 if args.quick else 512 if cuda else 256)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.requests = args.requests or (16 if args.quick else 256)
    args.seconds = args.seconds or (3.0 if args.quick else 20.0)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
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
        "performance": {"use_amp": args.device == "cuda", "warmup_batches": 2},
        "security": {"enable_authentication": True, "api_keys": [KEY]},
        "monitoring": {"enable_metrics": False, "log_json": True},
    }


# --- phase 1: raw ceiling -----------------------------------------------------------------------
def raw_ceiling(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    import torch

    from cxr_segmentation.masks import encode_png, encode_rle, logits_to_masks
    from cxr_segmentation.service import build_model
    from cxr_serving.images import decode_image
    from cxr_serving.settings import Settings

    settings = Settings.model_validate(config(args, args.batch_size, 0))
    model = build_model(settings)
    model.load()
    decoded = [decode_image(b) for b in images]
    tensors = [model.preprocess(d.pixels) for d in decoded]
    bs = args.batch_size

    def batches() -> Any:
        i = 0
        while True:
            yield [tensors[(i + k) % len(tensors)] for k in range(bs)]
            i += bs

    def run(with_masks: str | None) -> tuple[float, int]:
        done, started, it = 0, time.perf_counter(), batches()
        while done < args.requests and time.perf_counter() - started < args.seconds:
            batch = next(it)
            out = model.predict(batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if with_masks is not None:
                for j, logits in enumerate(out):
                    img = decoded[(done + j) % len(decoded)]
                    masks = logits_to_masks(logits, (img.height, img.width), 0.5)
                    for m in masks:
                        if with_masks == "png":
                            encode_png(m)
                        elif with_masks == "rle":
                            encode_rle(m)
            done += len(batch)
        return done / (time.perf_counter() - started), done

    model.predict(tensors[:1] * bs)  # warm the full batch shape (allocator, cuDNN autotune)
    forward_ips, n1 = run(None)
    with_png_ips, n2 = run("png")
    # per-image cost of the mask work alone, by encoding
    logits = model.predict(tensors[:1])[0]
    img = decoded[0]
    encoding_ms: dict[str, float] = {}
    for enc in ("none", "rle", "png"):
        reps, t0 = 0, time.perf_counter()
        while reps < 50 and time.perf_counter() - t0 < min(args.seconds, 5):
            masks = logits_to_masks(logits, (img.height, img.width), 0.5)
            for m in masks:
                if enc == "png":
                    encode_png(m)
                elif enc == "rle":
                    encode_rle(m)
            reps += 1
        encoding_ms[enc] = (time.perf_counter() - t0) / reps * 1000
    model.unload()
    return {
        "batch_size": bs,
        "forward_images_per_s": forward_ips,
        "forward_images": n1,
        "forward_plus_png_masks_images_per_s": with_png_ips,
        "forward_plus_png_masks_images": n2,
        "mask_work_ms_per_image": encoding_ms,
        "image_size": [img.height, img.width],
    }


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


async def service_phase(
    args: argparse.Namespace, images: list[bytes], batch_size: int, delay_ms: float, encodings: bool
) -> dict[str, Any]:
    with ServerProcess(config(args, batch_size, delay_ms)) as server:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
            stub = pb_grpc.SegmentationServiceStub(ch)
            await server.wait_ready(stub, images[0])
            for _ in range(2):  # warm the path end to end
                await stub.SegmentImage(request(images[0], "png"), metadata=(("x-api-key", KEY),))
            levels = [await load(stub, images, c, "png", args) for c in args.levels]
            by_encoding = {}
            if encodings:
                top = max(args.levels)
                by_encoding = {e: await load(stub, images, top, e, args) for e in ("rle", "none")}
                by_encoding["png"] = levels[args.levels.index(top)]
    return {"max_batch_size": batch_size, "max_batch_delay_ms": delay_ms, "levels": levels, "encodings": by_encoding}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = nih_images(args.images)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"segmentation bench: device={args.device} input={args.input_size} encoder={args.encoder} "
        f"batch={args.batch_size} levels={args.levels} (<= {args.requests} requests / {args.seconds:.0f} s each)",
        flush=True,
    )
    raw = raw_ceiling(args, images)
    print(
        f"raw ceiling: forward {raw['forward_images_per_s']:.1f} img/s, forward+PNG masks "
        f"{raw['forward_plus_png_masks_images_per_s']:.1f} img/s; mask work ms/img "
        + ", ".join(f"{k}={v:.1f}" for k, v in raw["mask_work_ms_per_image"].items()),
        flush=True,
    )
    service = asyncio.run(service_phase(args, images, args.batch_size, 5.0, encodings=True))
    naive = asyncio.run(service_phase(args, images, 1, 0.0, encodings=False))
    ratios: dict[str, dict[str, float]] = {"service_vs_raw_forward": {}, "service_vs_naive": {}}
    head = ("conc", "service img/s", "p50 ms", "p95 ms", "naive img/s", "vs raw", "vs naive")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 14, 8, 8, 12, 7, 9), strict=True)))
    for s, n in zip(service["levels"], naive["levels"], strict=True):
        c = str(s["concurrency"])
        ratios["service_vs_raw_forward"][c] = s["images_per_s"] / raw["forward_images_per_s"]
        ratios["service_vs_naive"][c] = s["images_per_s"] / n["images_per_s"] if n["images_per_s"] else 0.0
        print(
            f"{c:>5} {s['images_per_s']:>14.1f} {s['p50_ms'] or 0:>8.1f} {s['p95_ms'] or 0:>8.1f} "
            f"{n['images_per_s']:>12.1f} {ratios['service_vs_raw_forward'][c]:>7.2f} "
            f"{ratios['service_vs_naive'][c]:>9.2f}"
        )
    enc = service["encodings"]
    if enc:
        print("service at concurrency", max(args.levels), "by mask encoding (img/s): "
              + ", ".join(f"{k}={v['images_per_s']:.1f}" for k, v in enc.items()))  # fmt: skip
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
        "raw": raw,
        "service": service,
        "naive": naive,
        "ratios": ratios,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
