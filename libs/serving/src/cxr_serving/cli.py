"""`python -m cxr_<service> --config FILE`: the shared entry point of every service."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence

from cxr_serving import pixel_kernels
from cxr_serving.cpu_scheduling import apply_cpu_scheduling
from cxr_serving.errors import ConfigError
from cxr_serving.frontends import frontend_count, serve_with_frontends
from cxr_serving.heap import freeze_startup_heap, serve_this_process
from cxr_serving.logging_setup import setup_logging
from cxr_serving.optimize.event_loop import runner
from cxr_serving.otel import setup_tracing
from cxr_serving.server import ServiceBinding, create_server, serve
from cxr_serving.settings import Settings, load_settings


def run_service(service: str, build: Callable[[Settings], ServiceBinding], argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m cxr_{service}", description=f"cxr {service} gRPC service")
    ap.add_argument("--config", help="JSON config file (default: $CXR_CONFIG_PATH; env CXR_* overrides it)")
    ap.add_argument("--host", help="listen address (default: services.<name>.host)")
    ap.add_argument("--port", type=int, help="gRPC port, 0 for any free port (default: services.<name>.port)")
    ap.add_argument("--metrics-port", type=int, help="Prometheus port (default: services.<name>.metrics_port)")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"cxr-{service}: {exc}", file=sys.stderr)
        return 2
    mon = settings.monitoring
    setup_logging(service, settings.server_config.log_level, mon.log_json, mon.log_file)
    setup_tracing(service, mon, environment=settings.environment)
    try:
        binding = build(settings)
        server = create_server(settings, binding, host=args.host, port=args.port, metrics_port=args.metrics_port)
        frontends = frontend_count(settings, serves_models=binding.repository is not None)
    except ConfigError as exc:
        logging.getLogger(service).error("%s", exc)
        print(f"cxr-{service}: {exc}", file=sys.stderr)
        return 2
    run, loop_name = runner(settings.server_config.event_loop)  # validated by Settings: no ConfigError here
    serve_this_process()  # only now: a start refused above (in a test's own process too) marks nothing
    freeze_startup_heap()
    logging.getLogger(service).info("event loop: %s", loop_name)
    logging.getLogger(service).info("cpu scheduling: %s", apply_cpu_scheduling(settings.server_config.cpu_scheduling))
    if binding.repository is not None:  # the model services decode images; rag takes text
        pixel_kernels.report(logging.getLogger(service))
    if frontends > 1:
        run(
            serve_with_frontends(
                settings, binding, build, frontends, host=server.host, port=server._requested_port,
                metrics_port=server._metrics_port,
            )
        )  # fmt: skip
    else:
        run(serve(server))
    return 0


def _catalog_build(name: str, settings: Settings) -> ServiceBinding:
    return settings.catalog()[name].load_binding()(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cxr_serving <service> [--config FILE] ...`: run any service of the catalog by name."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m cxr_serving <service> [--config FILE] [--host H] [--port P] [--metrics-port M]")
        return 2
    name, rest = args[0], args[1:]
    return run_service(name, functools.partial(_catalog_build, name), rest)
