"""Export, quantize and run a torch network in OpenVINO, ONNX Runtime or TensorRT. Each backend writes its
artefact into a cache directory once and runs from it on every later load; every import is lazy, so a
backend whose library is missing fails its load (and the model falls back) instead of the service."""

from __future__ import annotations

import copy
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Forward = Callable[[Any], Any]  # torch.Tensor batch -> torch.Tensor output (on the input's device)


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library missing, no GPU, no native precision): the model serves torch."""


def require_float_layer_matches(patterns: tuple[str, ...], names: list[str]) -> None:
    """Each int8_float_layers pattern must match (re.match, as NNCF does) some node name of the exported
    network: one that matches none would leave its layers quantized without a word."""
    counts = {p: sum(1 for n in names if re.match(p, n)) for p in patterns}
    unmatched = [p for p, n in counts.items() if n == 0]
    if unmatched:
        raise BackendUnavailable(
            f"int8_float_layers {unmatched} match no node of the exported network ({len(names)} nodes, e.g. "
            f"{names[len(names) // 2] if names else 'none'!r}): fix the patterns"
        )
    if counts:
        log.info("int8_float_layers keep in float: %s", ", ".join(f"{p!r}: {n} nodes" for p, n in counts.items()))


def cpu_has_int8_dot_product() -> bool:
    """True when this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): without them int8
    still runs, emulated and slower. Read from /proc/cpuinfo where there is one, so asking imports no torch."""
    try:
        flags = {
            f
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for f in line.split()
        }
    except OSError:
        flags = set()
    if flags:
        return bool(flags & {"avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"})
    import torch

    probes = ("_is_vnni_supported", "_is_avx512_vnni_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def openvino_cpu_capabilities() -> list[str]:
    """OpenVINO's CPU plugin OPTIMIZATION_CAPABILITIES, e.g. ['BF16', 'FP32', 'INT8', ...]."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


class Backend(ABC):
    """One backend at one precision."""

    name: str
    recipe = "1"  # how this backend exports and quantizes: a new recipe makes new cache entries

    def __init__(self, precision: str, max_batch_size: int = 8, *, device: str = "cpu", tf32: bool = True) -> None:
        self.precision = precision
        self.max_batch_size = max_batch_size  # the most items the model's batcher puts in one forward
        self.device = device  # the model's device: a GPU backend builds and runs on it
        self.tf32 = tf32  # performance.tf32: whether float32 may compute in TensorFloat-32 on a GPU

    def build_settings(self) -> dict[str, Any]:
        """Settings beyond precision that shape the artefact (part of the cache key when not empty)."""
        return {}

    @abstractmethod
    def available(self) -> None:
        """Raise BackendUnavailable with the reason when it cannot run here."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Library versions an artefact depends on (part of the cache key)."""

    def profile(self, item_shape: tuple[int, ...]) -> EngineProfile | None:
        """The batch sizes an artefact is built for (part of the cache key); None: any."""
        return None

    @abstractmethod
    def export(
        self, module: Any, example: Any, calibration: list[Any], folder: Path, *, transformer: bool,
        float_layers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        """Write the artefact for `module` (float32, eval, CPU) into `folder`; int8 leaves the layers whose
        exported node names match a `float_layers` regex in float."""

    @abstractmethod
    def load(self, folder: Path) -> Forward:
        """The forward of the artefact in `folder`."""


def export_onnx(module: Any, example: Any, path: Path) -> None:
    """`module` as ONNX with a dynamic batch dimension (input `x`, output `y`): what both CPU backends start
    from (OpenVINO converts ONNX much faster than it traces torch)."""
    import torch

    module.eval()  # a wrapper module is built in training mode, and the exporter would keep that
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


class OpenVinoBackend(Backend):
    """OpenVINO on CPU: float32, bfloat16 (INFERENCE_PRECISION_HINT) or int8 (NNCF post-training quantization)."""

    name = "openvino"
    recipe = "2: onnx opset 17, int8 keeps a CNN's MatMul in float"
    compiled: Any = None  # the last load's CompiledModel

    def available(self) -> None:
        try:
            caps = openvino_cpu_capabilities()
        except ImportError as exc:
            raise BackendUnavailable(f"openvino is not installed ({exc})") from None
        if self.precision == "bfloat16" and "BF16" not in caps:
            raise BackendUnavailable(
                f"this CPU has no native bfloat16 (OpenVINO CPU capabilities {caps}): bfloat16 would be emulated"
            )
        if self.precision == "int8" and not cpu_has_int8_dot_product():
            log.warning("this CPU has no VNNI/AMX int8 instructions: int8 runs, but emulated and slower")

    def versions(self) -> dict[str, str]:
        import openvino as ov
        import torch

        out = {"openvino": ov.get_version(), "torch": torch.__version__}
        if self.precision == "int8":
            import nncf

            out["nncf"] = nncf.__version__
        return out

    def export(
        self, module: Any, example: Any, calibration: list[Any], folder: Path, *, transformer: bool,
        float_layers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        import openvino as ov

        onnx_path = folder / "model.onnx"
        export_onnx(module, example, onnx_path)
        model = ov.convert_model(str(onnx_path))
        if self.precision == "int8":
            import nncf

            items = [x.unsqueeze(0).numpy() for x in calibration]
            kwargs: dict[str, Any] = {"subset_size": len(items)}
            # a CNN's matrix products are its head: kept in float, its error would land on the outputs
            types = [] if transformer else ["MatMul"]
            if transformer:
                kwargs["model_type"] = nncf.ModelType.TRANSFORMER
            require_float_layer_matches(float_layers, [op.get_friendly_name() for op in model.get_ops()])
            if types or float_layers:
                kwargs["ignored_scope"] = nncf.IgnoredScope(types=types, patterns=list(float_layers), validate=False)
            model = nncf.quantize(model, nncf.Dataset(items), **kwargs)
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
        onnx_path.unlink()

    def load(self, folder: Path) -> Forward:
        import openvino as ov
        import torch

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": _threads()}
        # int8's layers left in float run float32: the plugin's default would be bfloat16 on a BF16 CPU
        config["INFERENCE_PRECISION_HINT"] = "bf16" if self.precision == "bfloat16" else "f32"
        compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", config)
        self.compiled = compiled  # what was compiled, with its properties (the tests read them)
        local = threading.local()  # an infer request serves one call at a time: one per batching thread

        def forward(x: Any) -> Any:
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = compiled.create_infer_request()
            out = request.infer({0: x.detach().cpu().numpy()})[0]
            return torch.from_numpy(out.copy())

        return forward


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime's CPU execution provider: float32, or int8 by static QDQ quantization."""

    name = "onnxruntime"
    recipe = "2: onnx opset 17, int8 QDQ U8S8 per channel, keeps a CNN's Gemm/MatMul in float"

    def available(self) -> None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc})") from None
        if self.precision == "int8" and not cpu_has_int8_dot_product():
            log.warning("this CPU has no VNNI/AMX int8 instructions: int8 runs, but emulated and slower")

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime
        import torch

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__}

    def export(
        self, module: Any, example: Any, calibration: list[Any], folder: Path, *, transformer: bool,
        float_layers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        plain = folder / "model.onnx"
        export_onnx(module, example, plain)
        if self.precision != "int8":
            return
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.items = iter([{"x": x.unsqueeze(0).numpy()} for x in calibration])

            def get_next(self) -> dict[str, Any] | None:
                return next(self.items, None)

        prepared = folder / "model.prepared.onnx"
        quant_pre_process(str(plain), str(prepared))
        head: list[str] = []
        if not transformer:  # a CNN's matrix products are its head: kept in float (as for OpenVINO)
            import onnx

            graph = onnx.load(str(prepared), load_external_data=False).graph
            head = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        if float_layers:
            import onnx

            graph = onnx.load(str(prepared), load_external_data=False).graph
            require_float_layer_matches(float_layers, [n.name for n in graph.node])
            head += [n.name for n in graph.node if any(re.match(f, n.name) for f in float_layers)]
        quantize_static(
            str(prepared),
            str(folder / "model.int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=head,
        )
        prepared.unlink()
        plain.unlink()

    def load(self, folder: Path) -> Forward:
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        name = "model.int8.onnx" if self.precision == "int8" else "model.onnx"
        session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

        def forward(x: Any) -> Any:
            return torch.from_numpy(session.run(None, {"x": x.detach().cpu().numpy()})[0])

        return forward


@dataclass(frozen=True)
class EngineProfile:
    """A TensorRT optimization profile over the batch dimension: the engine takes 1..max_batch items and its
    kernels are tuned for opt_batch."""

    item_shape: tuple[int, ...]
    max_batch: int
    opt_batch: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """torch_tensorrt.Input's min_shape, opt_shape and max_shape."""
        return {
            "min_shape": (1, *self.item_shape),
            "opt_shape": (self.opt_batch, *self.item_shape),
            "max_shape": (self.max_batch, *self.item_shape),
        }

    def key(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in self.shapes.items()}


def engine_profile(item_shape: tuple[int, ...], max_batch_size: int) -> EngineProfile:
    """The profile of a model whose batcher forms at most `max_batch_size` items: from a lone request up to the
    batcher's limit, tuned for a full batch (under load, when speed matters, the batcher fills every batch)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size}")
    return EngineProfile(tuple(item_shape), max_batch_size, max_batch_size)


def batch_slices(size: int, max_batch: int) -> list[slice]:
    """`size` items in slices of at most `max_batch`: an engine never sees a batch beyond its profile."""
    return [slice(i, min(i + max_batch, size)) for i in range(0, size, max_batch)]


INT8_MIN_CAPABILITY = (7, 5)  # int8 tensor cores from Turing on; TensorRT builds no fast int8 below


def cuda_capability(device: str = "cuda") -> tuple[int, int]:
    import torch

    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def tensorrt_compile_options(precision: str, *, tf32: bool, device: str) -> dict[str, Any]:
    """torch_tensorrt.compile's options for one precision on one device. Its dynamo path builds strongly typed
    engines: enabled_precisions has no effect there, lower precision comes from its autocast (float16) or from
    Q/DQ nodes (int8); float32 layers use TF32 unless performance.tf32 is off, as torch's do."""
    import torch

    options: dict[str, Any] = {"min_block_size": 1, "device": torch.device(device), "disable_tf32": not tf32}
    if precision in ("float16", "int8"):
        options.update(enable_autocast=True, autocast_low_precision_type=torch.float16)
    return options


def onnx_scope_paths(module: Any) -> dict[str, str]:
    """Each submodule's scope as torch.onnx.export writes it into node names, so one int8_float_layers regex
    selects the same layers on every backend: each called level keeps its name from its last non-numeric part
    on ('net.decoder.blocks.0.0' -> '/net/decoder/blocks.0/blocks.0.0/'); a ModuleList or ModuleDict is never
    called, so it adds no level."""
    from torch import nn

    def unqualified(name: str) -> str:  # as torch.onnx.utils._unqualified_variable_name
        atoms = name.split(".")
        for i in range(len(atoms) - 1, -1, -1):
            if not atoms[i].isnumeric():
                return ".".join(atoms[i:])
        return name

    modules = dict(module.named_modules())
    paths: dict[str, str] = {}
    for name in modules:
        if not name:
            continue
        atoms = name.split(".")
        prefixes = [".".join(atoms[: i + 1]) for i in range(len(atoms))]
        levels = [
            unqualified(p)
            for p in prefixes
            if p in modules and not isinstance(modules[p], (nn.ModuleList, nn.ModuleDict))
        ]
        paths[name] = "/" + "/".join(levels) + "/"
    return paths


def float_module_names(module: Any, *, transformer: bool, float_layers: tuple[str, ...]) -> list[str]:
    """The modules TensorRT int8 leaves in float: a CNN's Linear layers (its head, as for the CPU backends) and
    those whose ONNX scope ('/net/decoder/blocks.0/blocks.0.0/': `onnx_scope_paths`) matches an int8_float_layers
    regex."""
    from torch import nn

    paths = onnx_scope_paths(module)
    names = list(paths)
    require_float_layer_matches(float_layers, list(paths.values()))
    keep = [] if transformer else [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    keep += [name for name in names if name not in keep and any(re.match(f, paths[name]) for f in float_layers)]
    return keep


def modelopt_int8(
    module: Any, calibration: list[Any], *, transformer: bool, float_layers: tuple[str, ...], max_batch: int
) -> None:
    """Quantize `module` in place with ModelOpt's int8 recipe (per-channel weights, per-tensor activations, max
    calibration on `calibration`), inserting the Q/DQ nodes torch-tensorrt turns into int8 kernels."""
    import modelopt.torch.quantization as mtq
    import torch

    if not calibration:
        raise BackendUnavailable("int8 needs calibration images and none were loaded")
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    keep = float_module_names(module, transformer=transformer, float_layers=float_layers)
    config["quant_cfg"] = [*config["quant_cfg"], *({"quantizer_name": f"{n}.*", "enable": False} for n in keep)]
    device = next(module.parameters()).device
    items = torch.stack(calibration)

    def calibrate(model: Any) -> None:
        with torch.no_grad():
            for part in batch_slices(len(items), max_batch):
                model(items[part].to(device))

    mtq.quantize(module, config, forward_loop=calibrate)


def tensorrt_library_version() -> dict[str, str]:
    """The TensorRT library's version when it imports (torch-tensorrt pins one, but a reinstall can swap it
    under the same torch-tensorrt): an engine is only valid for the TensorRT that built it."""
    try:
        import tensorrt
    except ImportError:
        return {}
    return {"tensorrt": str(tensorrt.__version__)}


class TensorRtBackend(Backend):
    """torch-tensorrt (dynamo IR) on a CUDA device: float32, float16 (the engine's autocast) or int8 (ModelOpt
    post-training quantization, the layers it leaves unquantized in float16), for batches up to the model's
    max_batch_size."""

    name = "tensorrt"
    recipe = "2: dynamo, profile 1..max_batch_size (opt: max), float16 by enable_autocast, int8 by ModelOpt"

    def available(self) -> None:
        if not cuda_available():
            raise BackendUnavailable("tensorrt needs a CUDA device and none is available")
        if not self.device.startswith("cuda"):
            raise BackendUnavailable(f"tensorrt runs on a CUDA device and this model's device is {self.device}")
        if self.precision == "int8":
            capability = cuda_capability(self.device)
            if capability < INT8_MIN_CAPABILITY:
                raise BackendUnavailable(
                    f"this GPU (compute capability {capability[0]}.{capability[1]}) has no fast int8: TensorRT "
                    f"int8 needs {INT8_MIN_CAPABILITY[0]}.{INT8_MIN_CAPABILITY[1]} (Turing) or newer"
                )
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"torch-tensorrt is not installed ({exc})") from None
        if self.precision != "int8":
            return
        try:
            import modelopt.torch.quantization  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f"nvidia-modelopt is not installed ({exc}): TensorRT int8 quantizes with it (requirements/gpu.txt)"
            ) from None

    def versions(self) -> dict[str, str]:
        import torch
        import torch_tensorrt

        out = {
            "torch_tensorrt": torch_tensorrt.__version__,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(torch.device(self.device)),
        }
        out.update(tensorrt_library_version())
        if self.precision == "int8":
            import modelopt

            out["modelopt"] = modelopt.__version__
        return out

    def build_settings(self) -> dict[str, Any]:
        return {"tf32": self.tf32}

    def profile(self, item_shape: tuple[int, ...]) -> EngineProfile:
        return engine_profile(item_shape, self.max_batch_size)

    def export(
        self, module: Any, example: Any, calibration: list[Any], folder: Path, *, transformer: bool,
        float_layers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        import torch
        import torch_tensorrt

        profile = self.profile(tuple(example.shape[1:]))
        if profile.max_batch == 1:  # one shape: a static input (an export cannot make a 1..1 dimension dynamic)
            spec = torch_tensorrt.Input(shape=profile.shapes["max_shape"], dtype=torch.float32)
        else:
            spec = torch_tensorrt.Input(**profile.shapes, dtype=torch.float32)
        options = tensorrt_compile_options(self.precision, tf32=self.tf32, device=self.device)
        gpu_copy = copy.deepcopy(module).to(self.device).eval()  # `module` stays the CPU float32 reference
        if self.precision == "int8":  # torch-tensorrt traces a ModelOpt network's quantizers as Q/DQ ops
            modelopt_int8(
                gpu_copy, calibration, transformer=transformer, float_layers=float_layers, max_batch=profile.max_batch
            )
        with torch.no_grad():
            trt = torch_tensorrt.compile(gpu_copy, ir="dynamo", arg_inputs=[spec], **options)
        torch_tensorrt.save(trt, str(folder / "model.ep"), arg_inputs=[spec])

    def load(self, folder: Path) -> Forward:
        import torch
        import torch_tensorrt

        module = torch_tensorrt.load(str(folder / "model.ep")).module()
        max_batch, device = self.max_batch_size, torch.device(self.device)

        def forward(x: Any) -> Any:
            if x.shape[0] == 0:
                raise ValueError("an empty batch: TensorRT's profile starts at 1 item")
            with torch.inference_mode():
                x = x.to(device).contiguous()  # the engine's input binding is NCHW
                parts = [module(x[part]).float() for part in batch_slices(x.shape[0], max_batch)]
                return parts[0] if len(parts) == 1 else torch.cat(parts)

        return forward


BACKENDS: dict[str, type[Backend]] = {
    "openvino": OpenVinoBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRtBackend,
}
