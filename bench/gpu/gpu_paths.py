"""The model runtime's precision and compilation paths side by side, in ONE process (`make bench-gpu_paths`).

Each network (densenet121 @224, the Swin binary classifier @224, the U-Net resnet34 @512 on a GPU /
@256 on CPU) is loaded through the services' own loading code (`build_models` / `build_model`, so
`InferenceDevice.prepare` does the work) once per variant of the `performance` settings, and fed the
same real NIH images, preprocessed as the services do. Per variant: time to load (compilation and
warm-up included), forward img/s at the serving batch size, batch-1 p50, peak GPU memory, and how far
its outputs are from the plain float32 variant's (classification: largest probability difference;
segmentation: the share of mask pixels that differ). Ratios are to the first variant, measured in the
same run.

GPU variants: fp32 (TF32 off), tf32, amp (bfloat16 autocast), amp_cl (+ channels_last: the platform's
GPU default), amp_cl_bench (+ cudnn_benchmark: cuDNN times its algorithms for each shape), amp_cl_compile
(+ performance.compile_models, compile_mode default), amp_cl_compile_ro (compile_mode reduce-overhead:
CUDA graphs), tf32_compile (float32 with TF32, compiled); tf32_graphs and amp_cl_graphs
(performance.cuda_graphs: our own CUDA graph per batch size, the GPU default; every other variant runs
eagerly); trt_fp32, trt_fp16 and trt_int8 (`models.<name>.runtime` tensorrt: torch-tensorrt engines for
batches up to the serving batch, int8 quantized by ModelOpt, kept only if they pass the load-time accuracy
check; each row's backend/runtime_note says what served). Models load without
warm-up (`warmup_batches: 0`): `load_s` is the load itself, and the first batch of each shape, untimed, pays
the autotuning. CPU variants: eager (no fold, no trace), default (fold + channels_last + TorchScript trace),
amp (bfloat16, on CPUs with native bf16).

    .venv/bin/python -m bench.gpu.gpu_paths                  # CUDA if present, else CPU
    .venv/bin/python -m bench.gpu.gpu_paths --quick          # small inputs, a few batches (smoke run)
    .venv/bin/python -m bench.gpu.gpu_paths --variants fp32,amp_cl --models densenet121
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import GPU_RESULTS, REPO, machine, nih_pngs, stage, write_result
from bench._peers import ClassificationTask, SegmentationTask, StackOptions, device_sync, server_section
from bench.gpu._gpu_wheels import GPU_IMAGES

_EAGER = {"compile_models": False, "cuda_graphs": False}
RUNTIME = "runtime"  # a variant key that goes into the model's section, not `performance`
GPU_VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"use_amp": False, "tf32": False, "channels_last": False, **_EAGER},
    "tf32": {"use_amp": False, "tf32": True, "channels_last": False, **_EAGER},
    "amp": {"use_amp": True, "tf32": True, "channels_last": False, **_EAGER},
    "amp_cl": {"use_amp": True, "tf32": True, "channels_last": True, **_EAGER},
    "amp_cl_bench": {"use_amp": True, "tf32": True, "channels_last": True, "cudnn_benchmark": True, **_EAGER},
    "tf32_graphs": {
        "use_amp": False,
        "tf32": True,
        "channels_last": False,
        "compile_models": False,
        "cuda_graphs": True,
    },
    "amp_cl_graphs": {
        "use_amp": True,
        "tf32": True,
        "channels_last": True,
        "compile_models": False,
        "cuda_graphs": True,
    },
    "amp_cl_compile": {"use_amp": True, "tf32": True, "channels_last": True, "compile_models": True},
    "amp_cl_compile_ro": {
        "use_amp": True,
        "tf32": True,
        "channels_last": True,
        "compile_models": True,
        "compile_mode": "reduce-overhead",
    },
    "tf32_compile": {"use_amp": False, "tf32": True, "channels_last": False, "compile_models": True},
    # models.<name>.runtime (cxr_serving/runtimes): torch-tensorrt engines, checked against float32 torch at
    # load; without torch-tensorrt the row says which torch served and why (runtime_note)
    "trt_fp32": {
        "tf32": True,
        "channels_last": False,
        **_EAGER,
        RUNTIME: {"backend": "tensorrt", "precision": "float32"},
    },
    "trt_fp16": {
        "tf32": True,
        "channels_last": False,
        **_EAGER,
        RUNTIME: {"backend": "tensorrt", "precision": "float16"},
    },
    # int8 (ModelOpt, the rest float16) calibrates on half the shipped images and is checked on the other half
    "trt_int8": {
        "tf32": True,
        "channels_last": False,
        **_EAGER,
        RUNTIME: {
            "backend": "tensorrt",
            "precision": "int8",
            "check_images": GPU_IMAGES // 2,
            "calibration_images": GPU_IMAGES // 2,
        },
    },
}
CPU_VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"use_amp": False, "fold_batchnorm": False, "trace_models": False, "channels_last": False},
    "default": {"use_amp": False},
    "amp": {"use_amp": True},
}
CONFIG_KEYS = ("device", "batch_size", "input_size", "seg_input_size", "seconds", "images")
MODELS = {
    "densenet121": ("classification", "multiclass_classifier", {"model_type": "densenet121"}),
    "swin": ("classification", "binary_classifier", {"model_type": "swin_transformer"}),
    "unet_resnet34": ("segmentation", "segmentation", {"enabled": True, "encoder": "resnet34"}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs and few batches (a smoke run)")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when present)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", help="comma-separated; default every variant of the device")
    ap.add_argument("--batch-size", type=int, help="the serving batch (32 on a GPU, 8 on CPU, 4 quick)")
    ap.add_argument("--input-size", type=int, help="classifier input (224; quick 128)")
    ap.add_argument("--seg-input-size", type=int, help="U-Net input (512 on a GPU, 256 on CPU; quick 128)")
    ap.add_argument("--seconds", type=float, help="timed seconds per variant and batch size (3; quick 1)")
    ap.add_argument("--images", type=int, default=16, help="distinct NIH PNGs in the batch")
    ap.add_argument("--out", type=Path, help="default bench/gpu/results/gpu_paths[-cpu][-quick].json")
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    q = args.quick
    args.batch_size = args.batch_size or (4 if q else 32 if gpu else 8)
    args.input_size = args.input_size or (128 if q else 224)
    args.seg_input_size = args.seg_input_size or (128 if q else 512 if gpu else 256)
    args.seconds = args.seconds or (1.0 if q else 3.0)
    table = GPU_VARIANTS if gpu else CPU_VARIANTS
    names = args.variants.split(",") if args.variants else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown variants for {args.device}: {unknown} (choose from {sorted(table)})")
    args.variant_table = {n: table[n] for n in names}
    args.model_names = args.models.split(",")
    bad = [m for m in args.model_names if m not in MODELS]
    if bad:
        ap.error(f"unknown models {bad} (choose from {sorted(MODELS)})")
    return args


def settings_for(model: str, variant: dict[str, Any], args: argparse.Namespace) -> Any:
    from cxr_serving.settings import Settings

    task_name, key, section = MODELS[model]
    size = args.seg_input_size if task_name == "segmentation" else args.input_size
    opts = StackOptions(device=args.device, max_batch_size=args.batch_size, cpu_threads=None)
    variant = dict(variant)
    runtime = variant.pop(RUNTIME, None)
    model_section = {**section, "allow_untrained": True, "input_size": size}
    if runtime is not None:
        model_section["runtime"] = {
            "check_images": GPU_IMAGES,  # all .gpudata ships: float precisions calibrate on none
            **runtime,
            "cache_dir": str(REPO / "var/cache/model-runtimes-gpu"),
        }
    raw = {"models": {key: model_section}, **server_section(opts)}
    # no warm-up at load: on a GPU it runs every batch size (cuDNN autotunes each), minutes for 5 variants;
    # the timed loops below run one untimed batch of each shape first
    raw["performance"].update({"warmup_batches": 0, **variant})
    return Settings.model_validate(raw)


def task_for(model: str) -> Any:
    task_name, key, _ = MODELS[model]
    if task_name == "segmentation":
        return SegmentationTask()
    task = ClassificationTask()
    task.model_key = key
    return task


def as_array(output: Any) -> np.ndarray:
    """One image's output as numbers: classifier probabilities, a mask stack, or sigmoid of logits."""
    import torch

    if hasattr(output, "probabilities"):
        return np.asarray(output.probabilities, dtype=np.float64)
    if isinstance(output, torch.Tensor):
        t = output.detach().cpu()
        return t.numpy().astype(np.float64) if t.dtype == torch.bool else torch.sigmoid(t.double()).numpy()
    masks = getattr(output, "masks", output)
    return np.asarray(masks, dtype=np.float64)


def deviation(task_name: str, outs: list[Any], reference: list[Any]) -> float:
    """Classification: largest probability difference; segmentation: share of mask pixels that differ
    (or of thresholded probabilities)."""
    a = [as_array(o) for o in outs]
    b = [as_array(r) for r in reference]
    if task_name == "segmentation":
        return float(np.mean([np.mean((x > 0.5) != (y > 0.5)) for x, y in zip(a, b, strict=True)]))
    return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b, strict=True)))


def throughput(model: Any, batch: list[Any], seconds: float, sync: Any) -> tuple[float, int]:
    """Back-to-back forwards of `batch` for about `seconds` (after one untimed): img/s and batches."""
    model.predict(batch)
    sync()
    n, started = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - started < seconds:
        model.predict(batch)
        n += 1
        if n >= 10_000:
            break
    sync()
    return len(batch) * n / (time.perf_counter() - started), n


def p50_ms(model: Any, item: Any, seconds: float, sync: Any) -> float:
    model.predict([item])  # untimed: the batch-1 shape's first call (autotuning, compilation)
    sync()
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < stop_at and len(times) < 200):
        t0 = time.perf_counter()
        model.predict([item])
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def measure(model_name: str, variant_name: str, variant: dict[str, Any], pngs: list[bytes],
            args: argparse.Namespace, reference: dict[str, list[Any]]) -> dict[str, Any]:  # fmt: skip
    import torch

    task = task_for(model_name)
    task_name = MODELS[model_name][0]
    gpu = args.device.startswith("cuda")
    sync = device_sync(args.device)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = task.load(settings_for(model_name, variant, args))
    load_s = time.perf_counter() - t0
    prepared = [task.prepare(model, p)[1] for p in pngs]
    batch = [prepared[i % len(prepared)] for i in range(args.batch_size)]
    t0 = time.perf_counter()
    outs = model.predict(batch)  # the first full batch: autotuning and compilation happen here
    sync()
    first_s = time.perf_counter() - t0
    row: dict[str, Any] = {"load_s": round(load_s, 2), "first_batch_s": round(first_s, 2), "precision": model.precision}
    row.update(backend=model.backend, runtime_note=model.runtime_note)
    ips, batches = throughput(model, batch, args.seconds, sync)
    row.update(img_per_s=round(ips, 2), batches=batches, batch1_p50_ms=p50_ms(model, batch[0], args.seconds, sync))
    if gpu:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if reference:
        row["deviation_from_first"] = deviation(task_name, outs, reference["outs"])
    else:
        reference["outs"] = outs
    model.unload()
    del model, prepared, batch
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    pngs = nih_pngs(args.images)
    results: dict[str, Any] = {}
    data = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in CONFIG_KEYS},
        "variants": args.variant_table,
        "results": results,
    }
    suffix = ("" if args.device.startswith("cuda") else "-cpu") + ("-quick" if args.quick else "")
    out = args.out or GPU_RESULTS / f"gpu_paths{suffix}.json"
    for model_name in args.model_names:
        rows: dict[str, Any] = {}
        reference: dict[str, list[Any]] = {}
        for vname, variant in args.variant_table.items():
            with stage(f"{model_name} {vname}"):
                try:
                    rows[vname] = measure(model_name, vname, variant, pngs, args, reference)
                except Exception as exc:  # one path failing (say, compile) must not hide the others
                    rows[vname] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    if not reference:
                        break
            print(f"  {vname}: {rows[vname]}", flush=True)
            first = next(iter(rows.values()), {})
            for row in rows.values():
                if "img_per_s" in row and first.get("img_per_s"):
                    row["img_per_s_vs_first"] = round(row["img_per_s"] / first["img_per_s"], 3)
                    row["batch1_p50_vs_first"] = round(row["batch1_p50_ms"] / first["batch1_p50_ms"], 3)
            results[model_name] = rows
            write_result(f"gpu_paths{suffix}", data, out)  # after every variant: a cut-off run keeps its rows
    print_table(results)
    write_result(f"gpu_paths{suffix}", data, out)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"{'model':14} {'variant':15} {'img/s':>8} {'x first':>8} {'b1 p50 ms':>10} {'load s':>7} {'1st s':>6} "
          f"{'GPU MiB':>8} {'deviation':>10} precision")  # fmt: skip
    for model_name, rows in results.items():
        for vname, r in rows.items():
            if "error" in r:
                print(f"{model_name:14} {vname:15} ERROR {r['error'][:90]}")
                continue
            dev = r.get("deviation_from_first")
            print(
                f"{model_name:14} {vname:15} {r['img_per_s']:8.1f} {r.get('img_per_s_vs_first', 1.0):8.2f} "
                f"{r['batch1_p50_ms']:10.2f} {r['load_s']:7.1f} {r['first_batch_s']:6.1f} "
                f"{r.get('peak_gpu_mib', 0):8.0f} "
                f"{'' if dev is None else f'{dev:.2e}':>10} {r['precision']}"
            )


if __name__ == "__main__":
    sys.exit(main())
