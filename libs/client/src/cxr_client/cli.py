"""`cxr`: the command line of the platform, on top of `cxr_client`, so a shell script or an operator
needs no Python to classify, segment, ask, analyze and manage models.

Admin commands (`models load|unload|route|promote|rollback`, `ingest`, `dicom retry`) send only the admin
key and every other command only the inference key, so an inference key never reaches an admin RPC.
Commands, options and exit status: libs/client/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import Message

from cxr_client import catalog
from cxr_client.analyze import analyze_study, finding_threshold
from cxr_client.batch import batch_process_images
from cxr_client.client import AsyncCxrClient
from cxr_client.config import ClientConfig, ServiceName, TlsOptions
from cxr_client.errors import AdminKeyNotConfiguredError, CxrClientError, NotFoundError
from cxr_client.references import DEFAULT_REFERENCE_FLOOR
from cxr_client.report import to_html, to_json, to_markdown, write_report
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb

MODEL_SERVICES = tuple(name for name, entry in catalog.load().items() if entry.model_admin)  # the built-in ones
EVALUATION_NOT_RECORDED = 3  # `evaluate --record-card`: the reports are written, the card recording failed
STATE_NAMES = {0: "unspecified", 1: "unloaded", 2: "loading", 3: "ready", 4: "failed"}


def to_dict(msg: Message, *, drop_bytes: bool = True, always_fields: bool = False) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict (proto field names); bulky bytes fields summarised;
    `always_fields` keeps zero counts and false flags, so a script reads every key."""
    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=always_fields)
    if drop_bytes:
        _drop_bytes(d)
    return d


def _drop_bytes(node: Any) -> None:
    if isinstance(node, dict):
        for key in list(node):
            if key in ("png", "overlay_png", "dicom_seg", "heatmap_png") and isinstance(node[key], str):
                node[key] = f"<{len(node[key]) * 3 // 4} bytes>"
            else:
                _drop_bytes(node[key])
    elif isinstance(node, list):
        for item in node:
            _drop_bytes(item)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*cells[0]), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in cells[1:]]
    return "\n".join(line.rstrip() for line in lines)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


PRIORITY_HELP = "stat: served before routine requests in the model's queue (default routine)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr", description="Chest X-ray platform client (not for diagnosis).")
    p.add_argument("--endpoint", help="gRPC endpoint of every service, e.g. a gateway (env CXR_ENDPOINT)")
    p.add_argument("--api-key", help="API key of inference commands (env CXR_API_KEY)")
    p.add_argument(
        "--admin-api-key",
        help="admin key, sent only by models load/unload/route/promote/rollback, ingest and dicom retry "
        "(env CXR_ADMIN_API_KEY)",
    )
    p.add_argument("--timeout", type=float, help="deadline per call in seconds (default 30)")
    p.add_argument("--tls", action="store_true", help="use TLS (also: a grpcs:// endpoint)")
    p.add_argument("--ca", type=Path, help="PEM CA bundle to trust (turns TLS on)")
    p.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    p.add_argument("--key", type=Path, help="client key for mutual TLS")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify images (files or folders)")
    c.add_argument("images", nargs="+", type=Path)
    c.add_argument("--models", help="comma-separated model names (default: every ready model)")
    c.add_argument("--concurrency", type=int, default=4)
    c.add_argument("--all-findings", action="store_true", help="show negative findings too")
    c.add_argument("--priority", choices=("routine", "stat"), default="routine", help=PRIORITY_HELP)

    s = sub.add_parser("segment", help="segment one image, write masks")
    s.add_argument("image", type=Path)
    s.add_argument("--out", type=Path, help="folder for <image>_<label>.png masks (and the overlay)")
    s.add_argument("--classes", help="comma-separated classes (default: all)")
    s.add_argument("--threshold", type=float, default=0.0)
    s.add_argument("--overlay", action="store_true", help="also write the colour overlay PNG")
    s.add_argument("--priority", choices=("routine", "stat"), default="routine", help=PRIORITY_HELP)

    a = sub.add_parser("ask", help="ask the literature a question")
    a.add_argument("question")
    a.add_argument("--top-k", type=int, default=0)
    a.add_argument("--search-only", action="store_true", help="retrieve passages, no LLM answer")
    a.add_argument("--stream", action="store_true", help="print the answer as it is generated (StreamAnswer)")

    z = sub.add_parser("analyze", help="full study report: findings, CTR, literature")
    z.add_argument("image", type=Path)
    z.add_argument("--out", type=Path, help="folder for report.json, report.md, report.html, overlay.png")
    z.add_argument("--format", choices=("markdown", "html", "json"), default="markdown", help="what to print")
    z.add_argument("--top-k", type=int, default=3, help="references (documents) per positive finding")
    z.add_argument("--no-literature", action="store_true")
    z.add_argument(
        "--reference-floor",
        type=float,
        default=DEFAULT_REFERENCE_FLOOR,
        help="cosine similarity a passage needs to be cited for a finding (default %(default)s); below it the "
        "report says there is no reference above the floor",
    )
    z.add_argument("--heatmaps", action="store_true", help="Grad-CAM heatmaps of the positive findings")

    e = sub.add_parser(
        "evaluate", help="measure a classifier (labelled CSV) or a segmenter (reference masks) through the service"
    )
    e.add_argument(
        "labels",
        type=Path,
        metavar="LABELS_OR_MASKS",
        help="classification: CSV, NIH `Image Index`,`Finding Labels` or one 0/1 column per finding; "
        "segmentation: folder of reference masks <image-stem>/<class>.png (0 outside, nonzero inside)",
    )
    e.add_argument("images", type=Path, help="folder holding the images the CSV or the mask folders name")
    e.add_argument("--out", type=Path, required=True, help="folder for report.json/.md/.html and the plots")
    e.add_argument(
        "--task",
        choices=("auto", "classification", "segmentation"),
        default="auto",
        help="auto: segmentation when LABELS_OR_MASKS is a folder, classification when it is a file",
    )
    e.add_argument(
        "--model",
        help="model to evaluate (its serving version), or name@version for another loaded version; default: "
        "multiclass_classifier (classification), the only one served (segmentation)",
    )
    e.add_argument("--concurrency", type=int, default=4, help="classify/segment calls in flight")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each confidence interval")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's random generator")
    e.add_argument(
        "--bins", type=int, help="classification: equal-width probability bins of ECE and the plots (default 10)"
    )
    e.add_argument(
        "--threshold",
        type=float,
        help="segmentation: mask probability threshold in (0, 1) sent with each request (default: the model's own)",
    )
    e.add_argument(
        "--choose-thresholds",
        metavar="RULE",
        help="'sensitivity=0.9' or 'youden': choose per-finding thresholds on this data and write them "
        "to thresholds-<model>-<version>.json for `cxr models load --thresholds`",
    )
    e.add_argument(
        "--record-card",
        action="store_true",
        help="record the results on the model card of the version evaluated, a serving one or one loaded beside "
        "it (admin key; refused if that version is unloaded, or no longer serves when it served), after the "
        "reports are written: a refusal is a warning and exit code 3",
    )

    m = sub.add_parser("models", help="list, load or unload models, or show a model card")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list")
    any_model_service = f"a service with model admin: {', '.join(MODEL_SERVICES)} or one of CXR_SERVICE_CATALOG"
    ml.add_argument("--service", help=f"{any_model_service}; default: all of them")
    mload = msub.add_parser("load")
    mload.add_argument("service", help=any_model_service)
    mload.add_argument("model")
    mload.add_argument("--checkpoint", default="")
    mload.add_argument(
        "--thresholds", type=Path, help="thresholds file from `cxr evaluate --choose-thresholds` to apply"
    )
    mload.add_argument(
        "--side-by-side",
        action="store_true",
        help="load the new version beside the serving one, which keeps serving (then `cxr models route`)",
    )
    mun = msub.add_parser("unload", help="a model with every version, or one version that does not serve")
    mun.add_argument("service", help=any_model_service)
    mun.add_argument("model", help="name, or name@version")
    mroute = msub.add_parser("route", help="canary and shadow shares of a candidate version, and the version policy")
    mroute.add_argument("service", help=any_model_service)
    mroute.add_argument("model")
    mroute.add_argument("--candidate", default="", help="a loaded version other than the serving one (empty: none)")
    mroute.add_argument("--canary", type=float, default=0.0, help="percent of unpinned requests the candidate answers")
    mroute.add_argument(
        "--shadow", type=float, default=0.0, help="percent of requests also run on the candidate, for metrics only"
    )
    mroute.add_argument("--policy", choices=["latest", "pinned"], default="", help="what a plain load does")
    mpromote = msub.add_parser("promote", help="make a loaded version (default: the candidate) serve")
    mpromote.add_argument("service", help=any_model_service)
    mpromote.add_argument("model")
    mpromote.add_argument("version", nargs="?", default="")
    mrollback = msub.add_parser("rollback", help="the previous serving version serves again, at once")
    mrollback.add_argument("service", help=any_model_service)
    mrollback.add_argument("model")
    mcard = msub.add_parser("card", help="the model card of the version that serves, or of name@version")
    mcard.add_argument("service", help=any_model_service)
    mcard.add_argument("model", help="name (the serving version), or name@version (any loaded version)")

    g = sub.add_parser("ingest", help="add documents to the literature store (admin key)")
    g.add_argument("documents", type=Path, help="JSON lines, one cxr.rag.v1.Document each: id, text, title, source")

    d = sub.add_parser("dicom", help="the DICOM node: a study's state, the dead letter, retries")
    dsub = d.add_subparsers(dest="dicom_command", required=True)
    dstatus = dsub.add_parser("status", help="where each accepted instance of a study is (exit 1: unknown or dead)")
    dstatus.add_argument("study_uid", help="Study Instance UID")
    ddead = dsub.add_parser("dead-letters", help="instances the node gave up on, with the last error")
    ddead.add_argument("--study", default="", help="only this Study Instance UID")
    dretry = dsub.add_parser("retry", help="queue a dead-lettered instance, or all of them, again (admin key)")
    dretry.add_argument("sop_uid", nargs="?", help="SOP Instance UID (or --all)")
    dretry.add_argument("--all", action="store_true", help="every dead-lettered instance (e.g. after an outage)")
    dretry.add_argument("--study", default="", help="with --all: only this Study Instance UID's instances")

    sub.add_parser("health", help="health of every service")
    return p


def config_from_args(args: argparse.Namespace) -> ClientConfig:
    base = ClientConfig.from_env()
    update: dict[str, Any] = {}
    if args.endpoint:
        update["endpoint"] = args.endpoint
        update["endpoints"] = {}
    if args.api_key:
        update["api_key"] = args.api_key
    if args.admin_api_key:
        update["admin_api_key"] = args.admin_api_key
    if args.timeout:
        update["timeout_s"] = args.timeout
    if args.tls or args.ca or args.cert or args.key:
        update["tls"] = TlsOptions(
            enabled=True,
            root_certs_file=args.ca or base.tls.root_certs_file,
            client_cert_file=args.cert or base.tls.client_cert_file,
            client_key_file=args.key or base.tls.client_key_file,
            server_name_override=base.tls.server_name_override,
        )
    return ClientConfig.model_validate({**base.model_dump(), **update})


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


async def cmd_classify(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    summary = await batch_process_images(
        client,
        args.images,
        concurrency=args.concurrency,
        progress=sys.stderr.isatty(),
        model_names=_csv(args.models),
        priority=args.priority,
    )
    rows, data = [], []
    for r in summary.results:
        if r.error is not None:
            data.append({"file": str(r.path), "error": r.error.to_dict()})
            rows.append([r.path.name, "-", "ERROR", "-", "-", str(r.error)])
            continue
        data.append({"file": str(r.path), **to_dict(r.response)})
        for pred in r.response.predictions:
            tag = " (untrained)" if pred.model.untrained else ""
            for f in pred.findings:
                if args.all_findings or f.positive or len(pred.findings) <= 2:
                    rows.append(
                        [
                            r.path.name,
                            pred.model.name + tag,
                            f.label,
                            f"{f.probability:.3f}",
                            "none" if (t := finding_threshold(f)) is None else f"{t:.3f}",
                            "yes" if f.positive else "no",
                        ]
                    )
    _emit(args, data, table(rows, ["image", "model", "label", "prob", "thresh", "positive"]))
    return 1 if summary.failed else 0


async def cmd_segment(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    resp = await client.segment(
        args.image,
        classes=_csv(args.classes),
        threshold=args.threshold,
        mask_encoding="png" if args.out else "none",
        include_overlay=bool(args.out and args.overlay),
        priority=args.priority,
    )
    written: list[str] = []
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for mask in resp.masks:
            path = args.out / f"{args.image.stem}_{mask.label}.png"
            path.write_bytes(mask.png)
            written.append(str(path))
        if resp.overlay_png:
            path = args.out / f"{args.image.stem}_overlay.png"
            path.write_bytes(resp.overlay_png)
            written.append(str(path))
    m = resp.measurements
    rows = [[mk.label, mk.area_pixels, f"{mk.area_mm2:.0f}" if mk.area_mm2 else "-"] for mk in resp.masks]
    ctr = (
        f"{m.cardiothoracic_ratio:.3f}"
        if m.cardiothoracic_ratio
        else f"n/a ({m.cardiothoracic_ratio_unavailable_reason})"
    )
    warn = "\nWARNING: untrained model, masks are meaningless" if resp.untrained else ""
    text = (
        f"model {resp.model.name} {resp.model.version}{warn}\n"
        + table(rows, ["structure", "area_px", "area_mm2"])
        + f"\ncardiothoracic ratio: {ctr}"
        + "".join(f"\nwrote {w}" for w in written)
    )
    _emit(args, {**to_dict(resp), "written": written}, text)
    return 0


async def cmd_ask(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    if args.search_only:
        res = await client.search_literature(args.question, top_k=args.top_k)
        rows = [[i + 1, f"{p.score:.3f}", p.title[:60], p.source] for i, p in enumerate(res.passages)]
        _emit(args, to_dict(res), table(rows, ["#", "score", "title", "source"]))
        return 0
    if args.stream and not args.json:
        citations: list[Any] = []
        async for msg in client.stream_answer(args.question, top_k=args.top_k):
            if msg.text_delta:
                print(msg.text_delta, end="", flush=True)
            citations.extend(msg.citations)
        print("\n\n" + "\n".join(f"[{c.number}] {c.title} {c.source}".rstrip() for c in citations))
        return 0
    ans = await client.answer_question(args.question, top_k=args.top_k)
    cites = "\n".join(f"[{c.number}] {c.title} {c.source}".rstrip() for c in ans.citations)
    if ans.extractive:
        model = "\n(extractive answer: retrieved sentences, no language model)"
    else:
        model = f"\n({ans.llm.name} {ans.llm.version})" if ans.llm.name else ""
    _emit(args, to_dict(ans), f"{ans.answer}\n\n{cites}{model}".rstrip())
    return 0


async def cmd_analyze(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    report = await analyze_study(
        client,
        args.image,
        top_k=args.top_k,
        literature=not args.no_literature,
        heatmaps=args.heatmaps,
        reference_floor=args.reference_floor,
    )
    if args.out:
        paths = write_report(report, args.out)
        print("\n".join(f"wrote {p}" for p in paths.values()), file=sys.stderr)
    if args.json or args.format == "json":
        print(to_json(report))
    elif args.format == "html":
        print(to_html(report))
    else:
        print(to_markdown(report, overlay_path="overlay.png" if args.out and report.overlay_png else None))
    return 0


async def cmd_models(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    if args.models_command == "list":
        every = [name for name, entry in client.config.services.items() if entry.model_admin]
        services: list[ServiceName] = [args.service] if args.service else every
        infos, rc = [], 0
        for svc in services:
            try:
                infos += [(svc, m) for m in await client.list_models(svc)]
            except CxrClientError as err:
                print(f"{svc}: {err}", file=sys.stderr)
                rc = 1
        rows = [
            [
                svc,
                m.name,
                STATE_NAMES.get(m.state, m.state),
                m.version,
                m.role,
                f"{m.traffic_percent:g}" + (f" (+{m.shadow_percent:g} shadow)" if m.shadow_percent else ""),
                m.architecture,
                m.device,
                m.precision,
                "yes" if m.untrained else "no",
            ]
            for svc, m in infos
        ]
        data = [{"service": svc, **to_dict(m)} for svc, m in infos]
        columns = ["service", "model", "state", "version", "role", "traffic %", "architecture", "device"]
        _emit(args, data, table(rows, [*columns, "precision", "untrained"]))
        return rc
    if args.models_command == "route":
        routed = await client.set_model_routing(
            args.service,
            args.model,
            candidate_version=args.candidate,
            canary_percent=args.canary,
            shadow_percent=args.shadow,
            version_policy=args.policy,
        )
        lines = [f"{args.service}/{m.name}@{m.version}: {m.role} {m.traffic_percent:g}%" for m in routed]
        _emit(args, [to_dict(m) for m in routed], "\n".join(lines))
        return 0
    if args.models_command == "promote":
        info = await client.promote_model(args.service, args.model, args.version)
    elif args.models_command == "rollback":
        info = await client.rollback_model(args.service, args.model)
    elif args.models_command == "load":
        thresholds: dict[str, float] = {}
        version = ""
        if args.thresholds:
            from cxr_client.evaluation import read_threshold_file

            thresholds, version = read_threshold_file(args.thresholds, args.model)
        info = await client.load_model(
            args.service,
            args.model,
            checkpoint_path=args.checkpoint,
            thresholds=thresholds,
            thresholds_model_version=version,
            side_by_side=args.side_by_side,
        )
    elif args.models_command == "card":
        card = await client.get_model_card(args.service, args.model)
        _emit(args, to_dict(card, always_fields=True), card_text(card))
        return 0
    else:
        info = await client.unload_model(args.service, args.model)
    state = STATE_NAMES.get(info.state, info.state)
    role = f" ({info.role})" if info.role else ""
    _emit(args, to_dict(info), f"{args.service}/{info.name}: {state} {info.version}{role}".rstrip())
    return 0


def evaluation_task(args: argparse.Namespace) -> str:
    """The task `cxr evaluate` runs (from --task, or the kind of LABELS_OR_MASKS), with the options that belong
    to the other task refused before any image is sent."""
    task = str(args.task)
    if task == "auto":
        task = "segmentation" if args.labels.is_dir() else "classification"
    if task == "segmentation":
        other = [flag for flag, v in (("--bins", args.bins), ("--choose-thresholds", args.choose_thresholds)) if v]
        if other:
            raise ValueError(f"{', '.join(other)}: classification only, not with a segmentation evaluation")
        if not args.labels.is_dir():
            raise ValueError(f"{args.labels}: a segmentation evaluation needs a folder of reference masks")
    else:
        if args.threshold is not None:
            raise ValueError("--threshold: segmentation only (a classifier's thresholds come from LoadModel)")
        if args.labels.is_dir():
            raise ValueError(f"{args.labels}: a classification evaluation needs a label CSV, not a folder")
    return task


async def _record_card(
    client: AsyncCxrClient,
    args: argparse.Namespace,
    report: dict[str, Any],
    json_path: Path,
    record: Callable[[AsyncCxrClient, dict[str, Any]], Awaitable[dict[str, Any]]],
) -> int:
    """With --record-card, record the written report on its version's card; a refusal keeps the evaluation
    (already written) and is a warning and EVALUATION_NOT_RECORDED."""
    from cxr_client.evaluation_report import write_evaluation_json

    if not args.record_card:
        return 0
    rc = 0
    try:
        report["model_card"] = await record(client, report)
    except CxrClientError as err:
        report["model_card"] = {"recorded": False, "error": str(err)}
        print(f"cxr: warning: the evaluation is written but --record-card failed: {err}", file=sys.stderr)
        rc = EVALUATION_NOT_RECORDED
    write_evaluation_json(report, json_path)
    return rc


async def cmd_evaluate(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    from cxr_client.evaluation import evaluate, record_on_card  # numpy and matplotlib: the `evaluate` extra
    from cxr_client.evaluation_report import write_evaluation

    if evaluation_task(args) == "segmentation":
        from cxr_client.segmentation_evaluation import (  # scipy: the `evaluate` extra too
            evaluate_segmentation,
            record_segmentation_on_card,
        )

        report = await evaluate_segmentation(
            client,
            args.labels,
            args.images,
            model=args.model,
            threshold=args.threshold or 0.0,
            concurrency=args.concurrency,
            bootstrap=args.bootstrap,
            random_seed=args.seed,
        )
        paths = write_evaluation(report, args.out)
        print("\n".join(f"wrote {p}" for p in paths.values()), file=sys.stderr)
        rc = await _record_card(client, args, report, paths["json"], record_segmentation_on_card)
        _emit(args, report, "\n".join([report["status"], *report["notes"], segmentation_table(report)]))
        return rc
    report = await evaluate(
        client,
        args.labels,
        args.images,
        model=args.model or "multiclass_classifier",
        concurrency=args.concurrency,
        bootstrap=args.bootstrap,
        random_seed=args.seed,
        bins=10 if args.bins is None else args.bins,
        choose=args.choose_thresholds,
    )
    paths = write_evaluation(report, args.out)
    print("\n".join(f"wrote {p}" for p in paths.values()), file=sys.stderr)
    rc = await _record_card(client, args, report, paths["json"], record_on_card)
    text = "\n".join([report["status"], *report["notes"], evaluation_table(report)])
    _emit(args, report, text)
    return rc


def card_text(card: Any) -> str:
    """A model card for a terminal: what the model is, what it is for, how it did when evaluated."""
    lines = [
        f"{card.name} {card.version}{' (UNTRAINED)' if card.untrained else ''}: {card.architecture} ({card.task})",
        card.regulatory_status,
        f"labels: {', '.join(card.labels)}",
        "preprocessing: " + "; ".join(f"{k}={v}" for k, v in sorted(card.preprocessing.items())),
        f"intended use: {card.intended_use}",
        f"training data: {card.training_data or 'not declared'}",
        *(f"CONFLICT {c}" for c in card.conflicts),
    ]
    if card.HasField("evaluation") and card.evaluation.classes:
        ev = card.evaluation
        lines.append(
            f"evaluation {ev.evaluated_at}: {ev.dataset_images} images, dataset sha256 {ev.dataset_sha256}, "
            f"macro Dice {ev.macro_dice:.3f}"
        )
        rows = [
            [
                c.class_name,
                str(c.images),
                f"{c.dice_mean:.3f}",
                f"{c.dice_ci_low:.3f}-{c.dice_ci_high:.3f}",
                str(c.hd95_images),
                f"{c.hd95_mean:.1f}",
                f"{c.hd95_ci_low:.1f}-{c.hd95_ci_high:.1f}",
            ]
            for c in ev.classes
        ]
        lines.append(table(rows, ["class", "images", "Dice", "95% CI", "HD95 images", "HD95 px", "95% CI"]))
        lines += [f"note: {n}" for n in ev.notes]
    elif card.HasField("evaluation"):
        ev = card.evaluation
        lines.append(
            f"evaluation {ev.evaluated_at}: {ev.dataset_images} images, dataset sha256 {ev.dataset_sha256}, "
            f"macro AUROC {ev.macro_auroc:.3f}"
        )
        rows = [
            [f.finding, f"{f.auroc:.3f}", f"{f.auroc_ci_low:.3f}-{f.auroc_ci_high:.3f}", f"{f.threshold:.3f}"]
            for f in ev.findings
        ]
        lines.append(table(rows, ["finding", "AUROC", "95% CI", "threshold"]))
    else:
        lines.append(card.evaluation_note)
    lines.append(f"card: {card.source} (sha256 {card.digest})")
    return "\n".join(lines)


def evaluation_table(report: dict[str, Any]) -> str:
    from cxr_client.evaluation_report import HEADER, finding_rows

    m = report["model"]
    head = (
        f"{m['name']} {m['version']}{' (UNTRAINED)' if m['untrained'] else ''} on {report['dataset']['images']} images"
    )
    return head + "\n" + table(finding_rows(report), HEADER)


def segmentation_table(report: dict[str, Any]) -> str:
    from cxr_client.segmentation_report import HEADER, class_rows

    m = report["model"]
    head = (
        f"{m['name']} {m['version']}{' (UNTRAINED)' if m['untrained'] else ''} on {report['dataset']['images']} images"
    )
    return head + "\n" + table(class_rows(report), HEADER)


def read_documents(path: Path) -> list[rag_pb.Document]:
    """The documents of a JSON-lines file; a bad line is a usage error naming the line."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(ParseDict(json.loads(line), rag_pb.Document()))
            except (ValueError, ParseError) as exc:
                raise ValueError(f"{path}:{n}: not a cxr.rag.v1.Document: {exc}") from None
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


async def cmd_ingest(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    resp = await client.ingest_documents(read_documents(args.documents))
    added, present = resp.chunks_added, resp.chunks_skipped
    text = f"{resp.documents_received} documents: {added} chunks added, {present} already present"
    _emit(args, to_dict(resp), text)
    return 0


INSTANCE_STATES = {0: "unspecified", 1: "queued", 2: "in progress", 3: "done", 4: "dead"}
PRIORITIES = {0: "unspecified", 1: "stat", 2: "routine"}


def _instance_rows(instances: Sequence[Any]) -> list[list[Any]]:
    return [
        [
            i.sop_instance_uid,
            INSTANCE_STATES.get(i.state, i.state),
            PRIORITIES.get(i.priority, i.priority),
            i.attempts,
            i.last_error or "-",
        ]
        for i in instances
    ]


_INSTANCE_HEADER = ["sop_instance_uid", "state", "priority", "attempts", "last_error"]


async def cmd_dicom(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    if args.dicom_command == "status":
        try:
            st = await client.study_status(args.study_uid)
        except NotFoundError as err:
            raise NotFoundError(
                f"study {args.study_uid} is unknown to the DICOM node: no instance of it was accepted "
                f"(or it finished longer than done_retention_s ago) [{err.message}]",
                reason=err.reason,
                correlation_id=err.correlation_id,
            ) from None
        state = "finished" if st.finished else "in progress"
        counts = f"queued {st.queued}, in progress {st.in_progress}, done {st.done}, dead {st.dead}"
        text = f"study {st.study_instance_uid}: {state} ({counts})\n" + table(
            _instance_rows(st.instances), _INSTANCE_HEADER
        )
        _emit(args, to_dict(st, always_fields=True), text)
        return 1 if st.dead else 0
    if args.dicom_command == "dead-letters":
        dead = await client.list_dead_letters(args.study)
        data = [to_dict(i, always_fields=True) for i in dead]
        _emit(args, data, table(_instance_rows(dead), _INSTANCE_HEADER) if dead else "no dead-lettered instance")
        return 0
    if args.all == bool(args.sop_uid) or (args.study and not args.all):
        raise ValueError("dicom retry: give a SOP Instance UID, or --all [--study UID]")
    if args.all:
        return await _retry_all(client, args)
    requeued = await client.retry_dead_letter(args.sop_uid)
    text = (
        f"{args.sop_uid}: queued again"
        if requeued
        else f"{args.sop_uid}: not dead-lettered (unknown, queued, in progress or done): nothing to retry"
    )
    _emit(args, {"sop_instance_uid": args.sop_uid, "requeued": requeued}, text)
    return 0 if requeued else 1


async def _retry_all(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    """RetryDeadLetter for each instance ListDeadLetters names; one that left the dead letter meanwhile is skipped."""
    dead = await client.list_dead_letters(args.study)
    requeued = [i.sop_instance_uid for i in dead if await client.retry_dead_letter(i.sop_instance_uid)]
    skipped = len(dead) - len(requeued)
    text = f"{len(requeued)} dead-lettered instance(s) queued again" + (
        f", {skipped} no longer dead-lettered" if skipped else ""
    )
    _emit(args, {"requeued": requeued, "skipped": skipped}, text)
    return 0


async def cmd_health(client: AsyncCxrClient, args: argparse.Namespace) -> int:
    status = await client.health_all()
    rows = [[svc, client.config.endpoint_for(svc), status[svc]] for svc in status]
    data = {svc: {"endpoint": client.config.endpoint_for(svc), "status": status[svc]} for svc in status}
    _emit(args, data, table(rows, ["service", "endpoint", "status"]))
    return 0 if all(v == "SERVING" for v in status.values()) else 1


COMMANDS = {
    "classify": cmd_classify,
    "segment": cmd_segment,
    "ask": cmd_ask,
    "analyze": cmd_analyze,
    "models": cmd_models,
    "evaluate": cmd_evaluate,
    "ingest": cmd_ingest,
    "dicom": cmd_dicom,
    "health": cmd_health,
}


async def run(args: argparse.Namespace) -> int:
    async with AsyncCxrClient(config_from_args(args)) as client:
        return await COMMANDS[args.command](client, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except AdminKeyNotConfiguredError as err:
        if args.json:
            print(json.dumps({"error": err.to_dict()}, indent=2))
        print(f"cxr: {err.message}", file=sys.stderr)
        return 2
    except CxrClientError as err:
        if args.json:
            print(json.dumps({"error": err.to_dict()}, indent=2))
        print(f"cxr: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"cxr: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
