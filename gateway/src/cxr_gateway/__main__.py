"""`python -m cxr_gateway --kong gateway/kong.yml --config config/local.json`

Starts the development stand-in for Kong: REST (grpc-gateway transcoding) on --rest-port,
the gRPC proxy on --grpc-port, Prometheus /metrics and /status on --status-port.
`--check` only validates kong.yml; `--render` prints it with placeholders filled;
`--openapi` prints the OpenAPI document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cxr_gateway import kong_model
from cxr_gateway.local import LOCKED_PREFIX, local_defaults
from cxr_gateway.openapi import build_openapi
from cxr_gateway.roles import unprotected_admin_routes
from cxr_gateway.routes import ProtoCatalog
from cxr_serving.errors import ConfigError
from cxr_serving.optimize.event_loop import CHOICES, runner
from cxr_serving.settings import load_settings

log = logging.getLogger("cxr.gateway")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cxr_gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kong", default="gateway/kong.yml", help="Kong declarative config")
    ap.add_argument("--config", default=None, help="cxr JSON config (defaults for DECK_* placeholders)")
    ap.add_argument("--descriptor", default=None, help="descriptor set (default: protos.pb beside kong.yml)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--rest-port", type=int, default=int(os.environ.get("CXR_GATEWAY_REST_PORT", 8000)))
    ap.add_argument("--grpc-port", type=int, default=int(os.environ.get("CXR_GATEWAY_GRPC_PORT", 8001)))
    ap.add_argument("--status-port", type=int, default=int(os.environ.get("CXR_GATEWAY_STATUS_PORT", 8100)))
    ap.add_argument(
        "--event-loop",
        choices=CHOICES,
        default=os.environ.get("CXR_GATEWAY_EVENT_LOOP", "auto"),
        help="auto: uvloop when installed (cheaper wake-ups, so shorter calls at low concurrency)",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="validate kong.yml and the routes, then exit")
    mode.add_argument("--render", action="store_true", help="print kong.yml with placeholders filled")
    mode.add_argument("--openapi", action="store_true", help="print the OpenAPI document")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
        defaults = local_defaults(settings)
        text = Path(args.kong).read_text(encoding="utf-8")
        if args.render:
            sys.stdout.write(kong_model.render(text, os.environ, defaults))
            return 0
        kong = kong_model.parse(text, os.environ, defaults)
        descriptor = Path(args.descriptor) if args.descriptor else Path(args.kong).parent / "protos.pb"
        catalog = ProtoCatalog.load(descriptor)
    except (ConfigError, kong_model.KongConfigError, OSError) as exc:
        print(f"cxr_gateway: {exc}", file=sys.stderr)
        return 2
    open_admin = unprotected_admin_routes(kong, catalog)
    if open_admin:
        print(
            f"cxr_gateway: {args.kong}: admin RPCs open to non-admin consumers: {'; '.join(open_admin)}",
            file=sys.stderr,
        )
        return 2
    if "DECK_CXR_ADMIN_API_KEY" not in os.environ and defaults["DECK_CXR_ADMIN_API_KEY"].startswith(LOCKED_PREFIX):
        log.warning("no admin key (DECK_CXR_ADMIN_API_KEY or the config's admin key): admin routes refuse every key")
    if args.openapi:
        print(json.dumps(build_openapi(catalog), indent=2))
        return 0
    if args.check:
        print(f"{args.kong}: valid ({len(kong.services)} services, {sum(len(s.routes) for s in kong.services)} routes)")
        return 0
    try:
        run, name = runner(args.event_loop)
    except ConfigError as exc:
        print(f"cxr_gateway: {exc}", file=sys.stderr)
        return 2
    log.info("event loop: %s", name)
    result: int = run(_serve(kong, catalog, args))
    return result


async def _serve(kong: kong_model.KongConfig, catalog: ProtoCatalog, args: argparse.Namespace) -> int:
    from cxr_gateway.app import Gateway

    gw = Gateway(kong, catalog)
    ports = await gw.start(args.host, args.rest_port, args.grpc_port, args.status_port)
    base = f"http://{args.host}:{ports.rest}"
    log.warning(
        "cxr_gateway is a DEVELOPMENT STAND-IN for Kong: it enforces gateway/kong.yml (key-auth, rate-limiting, "
        "request-size-limiting, correlation-id, grpc-gateway) for local runs and tests; production runs Kong"
    )
    for b in gw.backends.values():
        log.info("backend %s -> %s", b.name, b.describe())
    print(
        f"\ngateway (Kong stand-in):\n  REST     {base}   (OpenAPI: {base}/openapi.json)\n"
        f"  gRPC     {args.host}:{ports.grpc}\n  metrics  http://{args.host}:{ports.status}/metrics\n"
        f"  try:     curl -s -H 'apikey: <your key>' {base}/v1/classification/models\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    await gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
