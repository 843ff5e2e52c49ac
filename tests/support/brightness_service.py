"""A 4th service added by following docs/adding-a-service.md: its catalog entry
(tests/support/brightness_catalog.json) and this binding are all it takes.

It answers the mean brightness of an image on the shared runtime (auth, decode pool, health,
metrics). Its one RPC is declared on existing messages (cxr.common.v1.Image in,
cxr.classification.v1.Finding out) through a generic handler, so the test needs no new proto
and no regenerated stubs; a product service writes protos/cxr/<name>/v1/*.proto (step 1 of the doc).
"""

from __future__ import annotations

import grpc
import numpy as np

from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_serving.images import DecodePool
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE = "cxr.brightness.v1.BrightnessService"
METHOD = f"/{SERVICE}/MeasureBrightness"


def build_binding(settings: Settings) -> ServiceBinding:
    """The catalog's `binding`: the shared server serves this under `services.brightness`."""
    pool = DecodePool.from_settings(settings)

    async def measure(request: common_pb2.Image, context: grpc.aio.ServicerContext) -> cls_pb.Finding:
        img = await pool.decode(request.data, request.content_type)
        mean = float(np.mean(img.pixels))  # pixels are in [0, 1]
        return cls_pb.Finding(label="brightness", probability=mean, threshold=0.5, positive=mean >= 0.5)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "MeasureBrightness": grpc.unary_unary_rpc_method_handler(
                measure,
                request_deserializer=common_pb2.Image.FromString,
                response_serializer=cls_pb.Finding.SerializeToString,
            )
        },
    )

    async def stop() -> None:
        pool.close()

    return ServiceBinding(
        name="brightness",
        full_service_names=[SERVICE],
        register=lambda server: server.add_generic_rpc_handlers((handler,)),
        on_stop=stop,
    )
