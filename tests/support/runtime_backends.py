"""Model-runtime backends that fail at one step for a real reason, to drive prepare_runtime's fallback on a
host without a GPU (TensorRT's steps are the same: export, load, warm-up, check)."""

from __future__ import annotations

from typing import Any

import torch

from cxr_serving.runtimes.backends import OnnxRuntimeBackend


class FixedBatchOnnx(OnnxRuntimeBackend):
    """An export built for batches of exactly 8 (as an engine whose profile leaves out batch 1): ONNX Runtime
    itself refuses the warm-up's batch 1, while the check's batches of 8 run."""

    def export(
        self, module: Any, example: Any, calibration: list[Any], folder: Any, *, transformer: bool,
        float_layers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        module.eval()
        torch.onnx.export(module, (example.expand(8, *example.shape[1:]),), str(folder / "model.onnx"),
                          input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)  # fmt: skip
