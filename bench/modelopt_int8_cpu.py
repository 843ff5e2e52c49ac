"""TensorRT int8's quantization, measured where no GPU is: the shipped ModelOpt recipe (`modelopt_int8`: the
CNN's head in float, max calibration) applied to DenseNet-121 and run as fake quantization on CPU, judged by the
load-time check (same split, same images, same bounds) against float32 torch. With and without the head in
float, side by side. The arithmetic of the quantized network only: no engine, no speed; TensorRT's kernels and
float16 elsewhere round on top of it.

Needs nvidia-modelopt importable (requirements/gpu.txt; on CPU `pip install --target DIR --no-deps
nvidia-modelopt nvidia-ml-py omegaconf antlr4-python3-runtime "pulp<4"` and DIR on PYTHONPATH):

    python -m bench.modelopt_int8_cpu [--input-size 224] [--calibration-images 64] [--check-images 100]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import RESULTS, machine, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--check-images", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=8, help="calibration and check batch (the model's max batch)")
    ap.add_argument("--out", type=Path, default=RESULTS / "modelopt_int8_cpu.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("modelopt") is None:  # `make bench` runs every module: not a failure here
        print("skipped: nvidia-modelopt is not importable (requirements/gpu.txt, or --target DIR on PYTHONPATH)")
        return 0
    import torch

    from cxr_classification.config import classifier_configs
    from cxr_classification.model import ChestXrayClassifier
    from cxr_classification.networks import LogitsOf
    from cxr_serving.device import InferenceDevice
    from cxr_serving.runtimes.backends import batch_slices, modelopt_int8
    from cxr_serving.runtimes.calibration import load_inputs, split_images
    from cxr_serving.runtimes.check import classification_check
    from cxr_serving.runtimes.config import default_calibration_dir
    from cxr_serving.settings import PerformanceConfig, Settings

    model = {"task": "multilabel_classification", "architecture": "densenet121", "allow_untrained": True}
    settings = Settings.model_validate({"models": {"m": {**model, "input_size": args.input_size}}})
    (cfg,) = classifier_configs(settings).values()
    classifier = ChestXrayClassifier("m", cfg, InferenceDevice.resolve("cpu", PerformanceConfig()))
    network, _ = classifier.build(None)
    decision = classifier.decision(network.has_operating_point())
    split = split_images(default_calibration_dir(), args.calibration_images, args.check_images)
    check = torch.stack(load_inputs(split.check, classifier.preprocess))
    calibration = load_inputs(split.calibration, classifier.preprocess)
    reference_net = LogitsOf(network).eval()

    def run(net: Any) -> Any:
        with torch.inference_mode():
            return torch.cat([net(check[s]) for s in batch_slices(len(check), args.max_batch)])

    reference = run(reference_net)
    rows: dict[str, Any] = {}
    for name, transformer in (("head_in_float", False), ("head_int8", True)):  # transformer: no Linear kept
        quantized = copy.deepcopy(reference_net)
        started = time.perf_counter()
        modelopt_int8(quantized, calibration, transformer=transformer, float_layers=(), max_batch=args.max_batch)
        calibrate_s = time.perf_counter() - started
        got = run(quantized)
        with torch.inference_mode():
            ref_p = network.probabilities(reference).numpy()
            got_p = network.probabilities(got).numpy()
        result = classification_check(ref_p, got_p, decision.thresholds, 0.02, 0.99)
        rows[name] = {"passed": result.passed, **result.numbers, "why": result.why, "calibrate_s": round(calibrate_s)}
        print(name, rows[name], flush=True)
    import modelopt

    data = {
        "machine": machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "host_note": "2 shared cores, other sessions' work running alongside; times are not the point here",
        "modelopt": modelopt.__version__,
        "model": "densenet121 random-init (allow_untrained, the service's fixed seed)",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "bounds": {"max_probability_delta": 0.02, "min_agreement": 0.99},
        "results": rows,
    }
    write_result("modelopt_int8_cpu", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
