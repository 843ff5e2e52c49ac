"""Plots of the latest results (`make bench` runs this last): bench/results/<name>.png.

  stack.png     throughput and p99 latency vs concurrency, one column per service (task), one line
                per peer (ceiling as a dashed line);
  openloop.png  answered/s and p99 vs offered rate, shed calls marked.
Reads bench/results/stack.json and openloop.json (or the -quick variants with --quick); a missing
file is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench._common import RESULTS

STYLE = {
    "service": ("tab:blue", "o"),
    "gateway_rest": ("tab:cyan", "s"),
    "gateway_grpc": ("tab:purple", "^"),
    "naive": ("tab:gray", "x"),
    "litserve": ("tab:orange", "D"),
    "litserve_folded": ("tab:red", "d"),
    "service_other_mode": ("tab:green", "v"),
    "service_eager": ("tab:olive", "^"),
    "service_one_frontend": ("tab:cyan", "D"),
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_stack(data: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for col, (task, res) in enumerate(tasks.items()):
        top, bottom = axes[0][col], axes[1][col]
        for peer, values in res["peers"].items():
            color, marker = STYLE.get(peer, ("black", "."))
            levels = values["levels"]
            xs = [r["concurrency"] for r in levels]
            top.plot(xs, [r["img_per_s"] for r in levels], marker=marker, color=color, label=peer)
            bottom.plot(xs, [r["p99_ms"] or float("nan") for r in levels], marker=marker, color=color, label=peer)
        in_turn = res.get("ceiling_in_turn")
        if in_turn:  # measured in the same rounds as the peers at each concurrency
            xs = [r["concurrency"] for r in in_turn]
            ys = [r["img_per_s"] for r in in_turn]
            top.plot(xs, ys, linestyle="--", color="black", label="ceiling (batched forward)")
        else:
            top.axhline(res["ceiling"]["img_per_s"], linestyle="--", color="black", label="ceiling (batched forward)")
        top.set_title(f"{task}: throughput")
        top.set_ylabel("images / s")
        bottom.set_title(f"{task}: p99 latency")
        bottom.set_ylabel("ms")
        bottom.set_yscale("log")
        levels = sorted({r["concurrency"] for v in res["peers"].values() for r in v["levels"]})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.set_xlabel("concurrent requests")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    machine = data.get("machine", {})
    device = f"{machine.get('gpu') or 'CPU'}, {machine.get('cpu_count')} cores"
    fig.suptitle(f"cxr stack vs peers — {device}, {data['when']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_openloop(data: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path, color in (("grpc", "tab:blue"), ("rest", "tab:cyan")):
        rows = data.get(path, {}).get("rates", [])
        xs = [r["offered_per_s"] for r in rows]
        left.plot(xs, [r["ok_per_s"] for r in rows], marker="o", color=color, label=f"{path}: answered OK/s")
        left.plot(xs, [r["shed"] / r["seconds"] for r in rows], marker="x", linestyle=":", color=color,
                  label=f"{path}: shed/s")  # fmt: skip
        right.plot(xs, [r["p99_ms"] or float("nan") for r in rows], marker="o", color=color, label=f"{path}: OK p99")
        right.plot(xs, [r["time_to_shed_p99_ms"] or float("nan") for r in rows], marker="x", linestyle=":",
                   color=color, label=f"{path}: time-to-shed p99")  # fmt: skip
    left.set_xlabel("offered requests / s")
    left.set_ylabel("per second")
    right.set_xlabel("offered requests / s")
    right.set_ylabel("ms")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("classification service, open loop (fixed arrival rate), bounded queue")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def markdown(data: dict[str, Any]) -> str:
    """The README table: img/s and p50/p99 per peer and concurrency, then the ratios."""
    lines = []
    for task, res in data["tasks"].items():
        levels = [r["concurrency"] for r in res["peers"]["service"]["levels"]] if "service" in res["peers"] else []
        c = res["ceiling"]
        lines += [
            f"**{task}** — ceiling (in-process batched forward, batch {c['batch_size']}, "
            f"{c.get('forward_threads', 1)} forward thread(s)): {c['img_per_s']:.1f} img/s; "
            f"one image in process: forward {c['forward_b1_p50_ms']:.0f} ms + decode/preprocess "
            f"{c['prepare_p50_ms']:.0f} ms + postprocess/response {c['finish_p50_ms']:.1f} ms",
            "",
            "| peer | start-up s | " + " | ".join(f"c={n}: img/s, p50/p99 ms, RSS MB" for n in levels) + " |",
            "|---|---:|" + "---:|" * len(levels),
        ]
        for peer, values in res["peers"].items():
            cells = [
                f"{r['img_per_s']:.1f}, {r['p50_ms'] or 0:.0f}/{r['p99_ms'] or 0:.0f}, {r['rss_peak_mb']:.0f}"
                for r in values["levels"]
            ]
            lines.append(f"| {peer} | {values.get('startup_s', 0):.1f} | " + " | ".join(cells) + " |")
        ratios = res["ratios"]
        lines += ["", "| ratio | " + " | ".join(f"c={n}" for n in levels) + " |", "|---|" + "---:|" * len(levels)]
        names = sorted({k for n in levels for k, v in ratios.get(f"c{n}", {}).items() if isinstance(v, float | int)})
        for name in names:
            vals = [ratios.get(f"c{n}", {}).get(name) for n in levels]
            lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
            won = [ratios.get(f"c{n}", {}).get(f"{name}_won_rounds") for n in levels]
            by_round = [ratios.get(f"c{n}", {}).get(f"{name}_by_round") for n in levels]
            if any(won):  # the same ratio within each round: how often the service was ahead, and the spread
                cells = [
                    f"{w} ({min(r):.2f}-{max(r):.2f})" if w and r else "" for w, r in zip(won, by_round, strict=True)
                ]
                lines.append(f"| {name}: rounds ahead (range) | " + " | ".join(cells) + " |")
        added = ratios.get("service_added_p50_ms_c1", {})
        extra = [f"{k} {v:+.1f} ms" for k, v in added.items()]
        extra += [f"{k} {ratios[k]:+.1f} ms" for k in ("gateway_rest_added_p50_ms_c1", "gateway_grpc_added_p50_ms_c1")
                  if k in ratios]  # fmt: skip
        lines += ["", "p50 added at c=1: service " + ", ".join(extra), ""]
    return "\n".join(lines)


def markdown_openloop(data: dict[str, Any]) -> str:
    cap = data["capacity"]
    lines = [
        f"Classification service, `max_queue_size` {data['settings']['server_config']['max_queue_size']}, "
        f"client deadline {data['timeout_s']:.0f} s; closed-loop capacity (c=16) {cap['img_per_s']:.1f} img/s.",
        "",
        "| path | offered/s | answered OK/s | OK p50/p99 ms | shed | time-to-shed p50/p99 ms | timeouts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(p, r) for p in ("grpc", "rest") for r in data.get(p, {}).get("rates", [])]
    if "litserve_overload" in data:
        rows.append(("litserve", data["litserve_overload"]))
    for path, r in rows:
        shed = f"{r['time_to_shed_p50_ms'] or 0:.0f}/{r['time_to_shed_p99_ms'] or 0:.0f}" if r["shed"] else "-"
        lines.append(
            f"| {path} | {r['offered_per_s']:.1f} | {r['ok_per_s']:.1f} | {r['p50_ms'] or 0:.0f}/{r['p99_ms'] or 0:.0f}"
            f" | {r['shed']} | {shed} | {r['codes'].get('TIMEOUT', 0)} |"
        )
    sat = {p: data.get(p, {}).get("saturation_per_s") for p in ("grpc", "rest")}
    lines += [
        "",
        "Saturation (highest offered rate served in full, answers keeping pace): "
        f"gRPC {sat['grpc']} req/s, REST {sat['rest']} req/s.",
    ]
    return "\n".join(lines)


def markdown_growth(data: dict[str, Any]) -> str:
    lines = ["| batch size | " + " | ".join(["classification img/s", "segmentation img/s"]) + " |", "|---:|---:|---:|"]
    seg = {r["batch_size"]: r for r in data["segmentation"]["by_batch_size"]}
    for r in data["classification"]["by_batch_size"]:
        s = seg.get(r["batch_size"])
        lines.append(f"| {r['batch_size']} | {r['img_per_s']:.2f} | {s['img_per_s'] if s else 0:.2f} |")
    lines += [
        "",
        "| input PNG | PNG KB | decode+preprocess ms | service img/s (c=8) | p50 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in data["classification"].get("by_image_size", []):
        lines.append(
            f"| {r['image_px']} px | {r['png_kb']:.0f} | {r['decode_preprocess_ms']:.1f} | {r['img_per_s']:.2f} "
            f"| {r['p50_ms'] or 0:.0f} |"
        )
    lines += ["", "| service | idle RSS MB | " + " | ".join(
        f"c={r['concurrency']}" for r in data["classification"]["rss_by_concurrency"]) + " |"]  # fmt: skip
    lines.append("|---|---:|" + "---:|" * len(data["classification"]["rss_by_concurrency"]))
    for name in ("classification", "segmentation"):
        d = data[name]
        lines.append(f"| {name} | {d['idle_rss_mb']:.0f} | " + " | ".join(
            f"{r['rss_peak_mb']:.0f}" for r in d["rss_by_concurrency"]) + " |")  # fmt: skip
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in data["startup_s"].items() if v is not None)
    lines += ["", f"Start-up to READY (process start to health SERVING / gateway /status): {starts}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="plot the -quick results")
    ap.add_argument("--markdown", action="store_true", help="print the stack table as markdown (bench/README.md)")
    args = ap.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    if args.markdown:
        tables = (
            ("stack", markdown),
            ("head_to_head", markdown),
            ("openloop", markdown_openloop),
            ("growth", markdown_growth),
        )
        for name, fn in tables:
            data = _load(name + suffix)
            print(f"<!-- {name}{suffix}.json -->")
            print(fn(data) if data else f"no {name} results", end="\n\n")
        return 0
    made = []
    for name, fn in (("stack", plot_stack), ("openloop", plot_openloop)):
        data = _load(name + suffix)
        if data is not None:
            made.append(fn(data, RESULTS / f"{name}{suffix}.png"))
    for path in made:
        print(f"wrote {path}")
    if not made:
        print("nothing to plot: run bench/stack.py or bench/openloop.py first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
