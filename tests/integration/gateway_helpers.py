"""Start the Kong stand-in in-process on 127.0.0.1 port 0 in front of given backend ports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from cxr_gateway import kong_model
from cxr_gateway.app import Gateway
from cxr_gateway.local import local_defaults
from cxr_gateway.routes import ProtoCatalog
from tests.conftest import REPO
from tests.support.servers import TEST_KEY, make_settings

KONG_YML = REPO / "gateway" / "kong.yml"
DESCRIPTOR = REPO / "gateway" / "protos.pb"
UNUSED_PORT = "1"  # services without a backend in a test: nothing listens there


def load_kong(ports: dict[str, int], key: str = TEST_KEY) -> kong_model.KongConfig:
    env = {"DECK_CXR_API_KEY": key}
    for name in ("classification", "segmentation", "rag"):
        env[f"DECK_{name.upper()}_HOST"] = "127.0.0.1"
        env[f"DECK_{name.upper()}_PORT"] = str(ports.get(name, UNUSED_PORT))
    return kong_model.load(KONG_YML, env, local_defaults(make_settings()))


def global_plugin(kong: kong_model.KongConfig, name: str):
    return next(p for p in kong.plugins if p.name == name)


@contextlib.asynccontextmanager
async def running_gateway(
    ports: dict[str, int], mutate: Callable[[kong_model.KongConfig], None] | None = None
) -> AsyncIterator[Gateway]:
    kong = load_kong(ports)
    if mutate is not None:
        mutate(kong)
    gw = Gateway(kong, ProtoCatalog.load(DESCRIPTOR))
    await gw.start("127.0.0.1", 0, 0, 0)
    try:
        yield gw
    finally:
        await gw.stop()
