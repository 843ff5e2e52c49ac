"""The same model behind every peer: our service, the gateway, a naive gRPC server, LitServe.

A `Task` (classification or segmentation) knows, for one settings JSON (the file the real
service reads), how to build and load the service's own model, how to turn PNG bytes into a
model input (`prepare`: the service's decode + preprocessing) and a model output into the
service's response (`finish`). The naive server and the LitServe API are thin shells around
those three steps, so every peer does the same work on the same weights. (The naive and LitServe peers build
their responses as a user would, one message per part; the service writes them in place, docs/serving-runtime.md.)

    python -m bench._peers naive --task classification --config cfg.json --port 50100
    python -m bench._peers litserve --task segmentation --config cfg.json --port 8123
    python -m bench._peers ceiling --task classification --config cfg.json --images 16   # stdin-driven
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls

from bench._common import (
    API_KEY,
    REPO,
    HttpStatusError,
    ServerProcess,
    free_port,
)


@dataclass(frozen=True)
class StackOptions:
    """Model and serving knobs shared by every peer in one run."""

    device: str = "cpu"
    input_size: int = 224
    seg_input_size: int = 256
    encoder: str = "resnet34"
    max_batch_size: int = 8
    batch_delay_ms: float = 5.0
    max_queue_size: int = 1024
    num_workers: int = 2
    mask_encoding: str = "png"
    cpu_threads: int | None = 1  # torch intra-op threads (performance.cpu_threads); None: torch's default
    model_instances: int = 1  # batches of the model at once (server_config.model_instances; LitServe workers)
    instance_mode: str = "thread"  # server_config.model_instance_mode: "thread" or "process"
    fold_batchnorm: bool = True  # performance.fold_batchnorm (the peers a user would write run without it)
    use_amp: bool | None = None  # performance.use_amp; None: on a GPU only (bfloat16 on CPU needs --amp)
    cpu_heap_pad_mb: int | None = None  # performance.cpu_heap_pad_mb; None: the platform's default
    trace_models: bool | None = None  # performance.trace_models; None: the platform's default
    cudnn_benchmark: bool = False  # performance.cudnn_benchmark (GPU; the platform's default)
    cuda_graphs: bool | None = None  # performance.cuda_graphs (GPU); None: the platform's default
    frontend_processes: int | None = None  # server_config.frontend_processes; None: the platform's default


def default_model_instances(device: str, torch_threads: int | None) -> int:
    """One batch per core on CPU (cores / torch threads), one on a GPU: the service's model_instances,
    LitServe's workers_per_device and the ceiling's forward threads in every benchmark."""
    if device.startswith("cuda"):
        return 1
    return max(1, (os.cpu_count() or 1) // (torch_threads or 1))


def server_section(o: StackOptions) -> dict[str, Any]:
    return {
        "server_config": {
            "device": o.device,
            "max_batch_size": o.max_batch_size,
            "max_batch_delay_ms": o.batch_delay_ms,
            "max_queue_size": o.max_queue_size,
            "num_workers": o.num_workers,
            "model_instances": o.model_instances,
            "model_instance_mode": o.instance_mode,
            **({} if o.frontend_processes is None else {"frontend_processes": o.frontend_processes}),
            "log_level": "WARNING",
            "shutdown_grace_s": 2,
        },
        "performance": {
            "use_amp": o.device.startswith("cuda") if o.use_amp is None else o.use_amp,
            "warmup_batches": 2,
            "cpu_threads": o.cpu_threads,
            "fold_batchnorm": o.fold_batchnorm,
            "cudnn_benchmark": o.cudnn_benchmark,
            **({} if o.cpu_heap_pad_mb is None else {"cpu_heap_pad_mb": o.cpu_heap_pad_mb}),
            **({} if o.trace_models is None else {"trace_models": o.trace_models}),
            **({} if o.cuda_graphs is None else {"cuda_graphs": o.cuda_graphs}),
        },
        "security": {"enable_authentication": True, "api_keys": [API_KEY]},
        "monitoring": {"enable_metrics": False, "log_json": True},
    }


class Task:
    name: str
    module: str  # python -m <module> starts the real service
    grpc_method: str
    rest_path: str

    def settings(self, o: StackOptions) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, settings: Any) -> Any:
        raise NotImplementedError

    def request(self, png: bytes, content_type: str = "image/png") -> Any:
        raise NotImplementedError

    def rest_body(self, png: bytes) -> dict[str, Any]:
        return {"image": {"data": base64.b64encode(png).decode(), "contentType": "image/png"}}

    def prepare(self, model: Any, png: bytes) -> tuple[Any, Any]:
        raise NotImplementedError

    def finish(self, model: Any, ctx: Any, output: Any) -> Any:
        raise NotImplementedError

    def response_cls(self) -> Any:
        raise NotImplementedError

    def model_info(self, model: Any) -> Any:
        from cxr_protos.common.v1 import common_pb2

        return common_pb2.ModelInfo(name=model.name, version=model.version, untrained=model.untrained)


class ClassificationTask(Task):
    name = "classification"
    module = "cxr_classification"
    grpc_method = "/cxr.classification.v1.ClassificationService/ClassifyImage"
    rest_path = "/v1/classification:classifyImage"
    model_key = "multiclass_classifier"

    def settings(self, o: StackOptions) -> dict[str, Any]:
        section = {"model_type": "densenet121", "allow_untrained": True, "input_size": o.input_size}
        return {"models": {self.model_key: section}, **server_section(o)}

    def load(self, settings: Any) -> Any:
        from cxr_classification.service import build_models
        from cxr_serving.device import InferenceDevice

        device = InferenceDevice.resolve(settings.server_config.device, settings.performance)
        model = build_models(settings, device)[self.model_key]
        model.load()
        return model

    def request(self, png: bytes, content_type: str = "image/png") -> Any:
        from cxr_protos.classification.v1 import classification_service_pb2 as pb
        from cxr_protos.common.v1 import common_pb2

        return pb.ClassifyImageRequest(image=common_pb2.Image(data=png, content_type=content_type))

    def prepare(self, model: Any, png: bytes) -> tuple[Any, Any]:
        from cxr_classification.model import ClassifierInput
        from cxr_serving.images import decode_image

        # the servicer's own step: the model preprocesses the decoded uint8 array (no float copy of the image first)
        return None, ClassifierInput(model.preprocess(decode_image(png, "image/png")))

    def finish(self, model: Any, ctx: Any, output: Any) -> Any:
        from cxr_protos.classification.v1 import classification_service_pb2 as pb

        rows = zip(model.labels, output.probabilities, model.thresholds, strict=True)
        findings = [pb.Finding(label=k, probability=float(p), threshold=t, positive=bool(p >= t)) for k, p, t in rows]
        prediction = pb.ModelPrediction(model=self.model_info(model), findings=findings)
        return pb.ClassifyImageResponse(predictions=[prediction], untrained=model.untrained)

    def response_cls(self) -> Any:
        from cxr_protos.classification.v1 import classification_service_pb2 as pb

        return pb.ClassifyImageResponse


class SegmentationTask(Task):
    name = "segmentation"
    module = "cxr_segmentation"
    grpc_method = "/cxr.segmentation.v1.SegmentationService/SegmentImage"
    rest_path = "/v1/segmentation:segmentImage"

    def __init__(self, mask_encoding: str = "png") -> None:
        self.mask_encoding = mask_encoding

    def settings(self, o: StackOptions) -> dict[str, Any]:
        section = {"enabled": True, "allow_untrained": True, "input_size": o.seg_input_size, "encoder": o.encoder}
        return {"models": {"segmentation": section}, **server_section(o)}

    def load(self, settings: Any) -> Any:
        from cxr_segmentation.service import build_model

        model = build_model(settings)
        model.load()
        return model

    def _encoding(self) -> int:
        from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb

        return int(pb.MaskEncoding.Value(f"MASK_ENCODING_{self.mask_encoding.upper()}"))

    def request(self, png: bytes, content_type: str = "image/png") -> Any:
        from cxr_protos.common.v1 import common_pb2
        from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb

        image = common_pb2.Image(data=png, content_type=content_type)
        return pb.SegmentImageRequest(image=image, mask_encoding=self._encoding())  # type: ignore[arg-type]

    def rest_body(self, png: bytes) -> dict[str, Any]:
        return {**super().rest_body(png), "maskEncoding": f"MASK_ENCODING_{self.mask_encoding.upper()}"}

    def prepare(self, model: Any, png: bytes) -> tuple[Any, Any]:
        from cxr_serving.images import decode_image

        image = decode_image(png, "image/png")
        tensor = model.preprocess(image)  # the uint8 array, as the servicer
        if getattr(model, "masks_on_device", False):  # as the servicer: masks made in the batch (GPU)
            from cxr_segmentation.model import SegmentationInput

            return image, SegmentationInput(tensor, (image.height, image.width), model.cfg.threshold)
        return image, tensor

    def finish(self, model: Any, ctx: Any, output: Any) -> Any:
        from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
        from cxr_segmentation.postprocess import postprocess
        from cxr_segmentation.servicer import SegmentationServicer, to_response
        from cxr_serving.proto_convert import image_metadata

        request = pb.SegmentImageRequest(mask_encoding=self._encoding())
        opts = SegmentationServicer._options(request, model, model.version)  # type: ignore[arg-type]
        result = postprocess(ctx, output, model.labels, opts)
        return to_response(result, status_info=self.model_info(model), image=image_metadata(ctx))

    def response_cls(self) -> Any:
        from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb

        return pb.SegmentImageResponse


def task_named(name: str, mask_encoding: str = "png") -> Task:
    return ClassificationTask() if name == "classification" else SegmentationTask(mask_encoding)


def load_settings_file(path: str) -> Any:
    from cxr_serving.settings import Settings

    return Settings.model_validate(json.loads(Path(path).read_text()))


# -- clients: one `call(i)` per peer ---------------------------------------------------------------
GrpcCall = Callable[[int], Awaitable[object]]


def grpc_call(
    channel: Any, task: Task, pngs: Sequence[bytes], timeout: float = 120, content_type: str = "image/png"
) -> GrpcCall:
    """Unary call of the task's RPC on `channel` with image i % len(pngs); the bytes are serialised once."""
    method = channel.unary_unary(
        task.grpc_method, request_serializer=lambda b: b, response_deserializer=task.response_cls().FromString
    )
    bodies = [task.request(p, content_type).SerializeToString() for p in pngs]
    metadata = (("x-api-key", API_KEY),)

    async def call(i: int) -> object:
        return await method(bodies[i % len(bodies)], metadata=metadata, timeout=timeout)

    return call


def http_call(session: Any, url: str, bodies: Sequence[bytes], headers: dict[str, str] | None = None) -> GrpcCall:
    """POST JSON body i % len(bodies); non-2xx raises HttpStatusError (429 = shed)."""
    hdrs = {"Content-Type": "application/json", "apikey": API_KEY, **(headers or {})}

    async def call(i: int) -> object:
        async with session.post(url, data=bodies[i % len(bodies)], headers=hdrs) as r:
            payload = await r.read()
            if r.status >= 300:
                raise HttpStatusError(r.status)
            return payload

    return call


# -- launching every peer as its own process --------------------------------------------------------
def write_settings(task: Task, o: StackOptions, directory: Path) -> Path:
    path = directory / f"{task.name}.json"
    path.write_text(json.dumps(task.settings(o)))
    return path


def service_process(task: Task, config: Path, port: int, env: dict[str, str] | None = None) -> ServerProcess:
    """The real service: `python -m cxr_<task> --config ... --port ...` (`env` on top of ours)."""
    cmd = [sys.executable, "-m", task.module, "--config", str(config), "--port", str(port), "--metrics-port", "0"]
    return ServerProcess(cmd, env=env, name=f"{task.name} service").start()


def peer_process(kind: str, task: Task, config: Path, port: int, mask_encoding: str = "png") -> ServerProcess:
    """`naive` (gRPC, one forward per request) or `litserve` (HTTP, LitServe's batching)."""
    cmd = [sys.executable, "-m", "bench._peers", kind, "--task", task.name, "--config", str(config),
           "--port", str(port), "--mask-encoding", mask_encoding]  # fmt: skip
    return ServerProcess(cmd, name=f"{task.name} {kind}").start()


@dataclass
class GatewayPorts:
    rest: int
    grpc: int
    status: int


def gateway_process(backends: dict[str, int], directory: Path) -> tuple[ServerProcess, GatewayPorts]:
    """The Kong stand-in on gateway/kong.yml; only the per-minute rate limit is lifted (a benchmark is not a client)."""
    kong = (REPO / "gateway" / "kong.yml").read_text()
    if "minute: 100," not in kong:
        raise RuntimeError("gateway/kong.yml: the rate-limiting plugin changed; update bench/_peers.py")
    path = directory / "kong.yml"
    path.write_text(kong.replace("minute: 100,", "minute: 100000000,"))
    ports = GatewayPorts(free_port(), free_port(), free_port())
    env = {"DECK_CXR_API_KEY": API_KEY, "DECK_BACKEND_PROTOCOL": "grpc"}
    for name in ("classification", "segmentation", "rag"):
        env[f"DECK_{name.upper()}_HOST"] = "127.0.0.1"
        env[f"DECK_{name.upper()}_PORT"] = str(backends.get(name, 1))
    cmd = [
        sys.executable, "-m", "cxr_gateway", "--kong", str(path), "--descriptor", str(REPO / "gateway" / "protos.pb"),
        "--rest-port", str(ports.rest), "--grpc-port", str(ports.grpc), "--status-port", str(ports.status),
    ]  # fmt: skip
    return ServerProcess(cmd, env=env, name="gateway").start(), ports


# -- (d) the naive gRPC server ---------------------------------------------------------------------
def serve_naive(task: Task, settings: Any, port: int, threads: int) -> None:
    """What one writes first (grpc examples' style): a thread pool, one forward pass per request."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    model = task.load(settings)

    def handle(request: Any, context: Any) -> Any:
        ctx, item = task.prepare(model, request.image.data)
        (out,) = model.predict([item])
        return task.finish(model, ctx, out)

    service, method = task.grpc_method.rsplit("/", 1)
    handler = grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=type(task.request(b"")).FromString,
        response_serializer=lambda m: m.SerializeToString(),
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.lstrip("/"), {method: handler})])
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


# -- (e) LitServe with its dynamic batching ----------------------------------------------------------
class PeerAPI(ls.LitAPI):  # type: ignore[misc]
    """decode_request = the service's decode + preprocess; predict = one batched forward; LitServe batches."""

    def __init__(self, task_name: str, mask_encoding: str, config: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_name, self.mask_encoding, self.config = task_name, mask_encoding, config

    def setup(self, device: str) -> None:
        self.task = task_named(self.task_name, self.mask_encoding)
        self.model = self.task.load(load_settings_file(self.config))

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe then passes the JSON
        return self.task.prepare(self.model, base64.b64decode(request["image"]["data"]))

    def batch(self, inputs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        return inputs

    def predict(self, x: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        outs = self.model.predict([item for _, item in x])
        return [(ctx, out) for (ctx, _), out in zip(x, outs, strict=True)]

    def unbatch(self, output: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        return output

    def encode_response(self, output: tuple[Any, Any]) -> dict[str, Any]:
        from google.protobuf import json_format

        return dict(json_format.MessageToDict(self.task.finish(self.model, *output)))


def serve_litserve(args: argparse.Namespace, settings: Any) -> None:
    sc = settings.server_config
    api = PeerAPI(
        args.task, args.mask_encoding, args.config, max_batch_size=sc.max_batch_size,
        batch_timeout=sc.max_batch_delay_ms / 1000,
    )  # fmt: skip
    # litserve 0.2.19 turns its MCP endpoint on when `mcp` is installed but imports it only with
    # `fastmcp`, then fails with NameError: MCPServer; the benchmark needs no MCP endpoint.
    import litserve.server

    litserve.server._MCP_AVAILABLE = False
    accelerator = "cuda" if str(sc.device).startswith("cuda") else "cpu"
    # The same parallelism as our service: model_instances workers (LitServe's are processes, one model each).
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=sc.model_instances, timeout=120)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)


# -- ceiling worker: batched forwards in a process of its own (the ceiling of process instances) ----
def ceiling_worker(task: Task, settings: Any, images: int) -> None:
    """Load the model, build one full batch of prepared inputs, print `ready`; then for each stdin line
    `MAX_IMAGES MAX_SECONDS` run that batch back to back until either bound and print `IMAGES WALL_S`."""
    import time

    from bench._common import nih_pngs

    model = task.load(settings)
    pngs = nih_pngs(images)
    prepared = [task.prepare(model, p)[1] for p in pngs]
    bs = settings.server_config.max_batch_size
    batch = [prepared[i % len(prepared)] for i in range(bs)]
    model.predict(batch)  # warm the full batch shape
    sync = device_sync(settings.server_config.device)
    print("ready", flush=True)
    for line in sys.stdin:
        max_images, max_seconds = int(line.split()[0]), float(line.split()[1])
        done, started = 0, time.perf_counter()
        while done < max_images and time.perf_counter() - started < max_seconds:
            model.predict(batch)
            sync()
            done += len(batch)
        print(done, time.perf_counter() - started, flush=True)


def device_sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["naive", "litserve", "ceiling"])
    ap.add_argument("--task", choices=["classification", "segmentation"], required=True)
    ap.add_argument("--config", required=True, help="the settings JSON the real service reads")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mask-encoding", default="png")
    ap.add_argument("--threads", type=int, default=10, help="naive: gRPC thread pool size")
    ap.add_argument("--images", type=int, default=16, help="ceiling: distinct NIH PNGs in its batch")
    args = ap.parse_args(argv)
    settings = load_settings_file(args.config)
    if args.kind == "ceiling":
        ceiling_worker(task_named(args.task, args.mask_encoding), settings, args.images)
    elif args.kind == "naive":
        serve_naive(task_named(args.task, args.mask_encoding), settings, args.port, args.threads)
    else:
        serve_litserve(args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
