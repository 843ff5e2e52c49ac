"""A segmentation evaluation report (segmentation_evaluation.py) as JSON, Markdown, and a self-contained
HTML page with the per-image Dice and HD95 of each class plotted (also written as metrics.png)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from cxr_client.evaluation_report import NOT_ESTIMABLE, STYLE, status_html, table_html, write_evaluation_json

HEADER = ["class", "images", "Dice mean", "Dice 95% CI", "Dice median", "HD95 mean (px)", "HD95 95% CI",
          "HD95 images", "both empty", "missed", "spurious"]  # fmt: skip
PLOT = "metrics.png"


def _num(value: float | None, digits: int = 3) -> str:
    return NOT_ESTIMABLE if value is None else f"{value:.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 3) -> str:
    return NOT_ESTIMABLE if ci is None else f"{ci[0]:.{digits}f}–{ci[1]:.{digits}f}"


def class_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per class; HD95 without an image where both masks are non-empty shows as not estimable."""
    return [
        [
            c["class"],
            str(c["images"]),
            _num(c["dice_mean"]),
            _ci(c["dice_ci95"]),
            _num(c["dice_median"]),
            _num(c["hd95_mean"], 2),
            _ci(c["hd95_ci95"], 2),
            str(c["hd95_images"]),
            str(c["both_empty"]),
            str(c["missed"]),
            str(c["spurious"]),
        ]
        for c in report["classes"]
    ]


def summary_lines(report: dict[str, Any]) -> list[str]:
    m, d, s = report["model"], report["dataset"], report["settings"]
    return [
        f"Model: {m['name']} version {m['version']} ({m['architecture']}), "
        f"untrained: {'YES' if m['untrained'] else 'no'}",
        f"Dataset: {d['images']} images with reference masks, sha256 {d['sha256']} (masks {d['masks']}, "
        f"layout {d['layout']})",
        f"Threshold: {s['threshold']}. Distances in {s['units']}. HD95: {s['hd95']}; mean over the images where "
        "both masks are non-empty (HD95 images); 'missed': reference non-empty, prediction empty; 'spurious': "
        "the reverse; both empty counts as Dice 1.",
        f"95% CI: {s['ci']}, {s['bootstrap']} resamples, random generator seed {s['random_seed']}.",
        f"Macro Dice (mean over classes): {report['macro_dice']:.3f}",
    ]


def metrics_png(report: dict[str, Any]) -> bytes:
    """Per class, each image's Dice and HD95 as points with the mean as a bar (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c["class"] for c in report["classes"]]
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.1 * len(classes), 3.4), dpi=100)
    try:
        for ax, key, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (pixels)")):
            for i, c in enumerate(classes):
                values = [r[key] for r in report["per_image"] if r["class"] == c and r[key] is not None]
                if values:
                    ax.plot([i] * len(values), values, "o", ms=3, alpha=0.4, c="C0")
                    ax.plot([i - 0.3, i + 0.3], [sum(values) / len(values)] * 2, c="C3", lw=2)
            ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(label)
        axes[0].set_ylim(-0.02, 1.02)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Segmentation evaluation of {report['model']['name']}", "", f"**{report['status']}**", ""]
    lines += [f"> **{n}**" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"- {line}" for line in summary_lines(report)] + [""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in class_rows(report)]
    if report["not_evaluated"]:
        lines += ["", f"No reference masks (not evaluated): {', '.join(report['not_evaluated'])}"]
    lines += ["", f"![Dice and HD95 per image]({PLOT})"]
    return "\n".join(lines) + "\n"


def to_html(report: dict[str, Any], png: bytes) -> str:
    """One page, no external resources: the plot is a data: URI."""
    name = html.escape(report["model"]["name"])
    notes = "".join(f'<p class="note"><strong>{html.escape(n)}</strong></p>' for n in report["notes"])
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(report))
    missing = report["not_evaluated"]
    return "".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>Segmentation evaluation of {name}</title>",
            STYLE,
            "</head><body>",
            f"<h1>Segmentation evaluation of {name}</h1>",
            status_html(report),
            notes,
            f"<ul>{summary}</ul>",
            table_html(HEADER, class_rows(report)),
            f"<p>No reference masks (not evaluated): {html.escape(', '.join(missing))}</p>" if missing else "",
            "<h2>Dice and HD95 per image</h2>",
            f'<img alt="Dice and HD95 per image" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
            "</body></html>",
        ]
    )


def write_segmentation_evaluation(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md, report.html and metrics.png; returns the paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    png = metrics_png(report)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_evaluation_json(report, paths["json"])
    paths["markdown"].write_text(to_markdown(report), encoding="utf-8")
    paths["html"].write_text(to_html(report, png), encoding="utf-8")
    paths["plot"] = out / PLOT
    paths["plot"].write_bytes(png)
    return paths
