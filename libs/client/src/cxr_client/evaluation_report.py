"""An evaluation report (evaluation.py) as JSON, Markdown, a self-contained HTML page with the
reliability plots embedded, one reliability PNG per finding, and the thresholds file when chosen."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from cxr_client.evaluation import threshold_file

NOT_ESTIMABLE = "not estimable"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def plot_file(label: str) -> str:
    return f"reliability_{_safe(label)}.png"


def plot_files(labels: list[str]) -> dict[str, str]:
    """The PNG name of each label's plot: `plot_file`, or, when two labels would share a name (`_safe` maps
    several characters to `_`; file systems may ignore case), every name prefixed with the label's index."""
    plain = {label: plot_file(label) for label in labels}
    if len({name.lower() for name in plain.values()}) == len(labels):
        return plain
    return {label: f"reliability_{i:02d}_{_safe(label)}.png" for i, label in enumerate(labels)}


def reliability_png(finding: dict[str, Any]) -> bytes:
    """The reliability diagram of one finding (observed rate vs mean probability per bin) as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rel = finding["reliability"]
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    try:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
        pts = [(m, r) for m, r in zip(rel["mean_probability"], rel["observed_rate"], strict=True) if m is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", c="C0", label="model")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed positive rate")
        ax.set_title(f"{finding['finding']} (ECE {finding['ece']:.3f})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _num(value: float | None, digits: int = 3) -> str:
    return NOT_ESTIMABLE if value is None else f"{value:.{digits}f}"


def _ci(f: dict[str, Any]) -> str:
    ci = f["auroc_ci95"]
    return NOT_ESTIMABLE if ci is None else f"{ci[0]:.3f}–{ci[1]:.3f}"


def _threshold(f: dict[str, Any]) -> str:
    return "none" if f["threshold"] is None else f"{f['threshold']:.4g}"


NO_THRESHOLD = "no threshold (never positive)"


def finding_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per finding; a label the service never thresholds shows that, not a 0/1 'measurement'."""
    return [
        [
            f["finding"],
            str(f["positives"]),
            str(f["negatives"]),
            _num(f["auroc"]),
            _ci(f),
            _threshold(f),
            NO_THRESHOLD if "threshold_note" in f else _num(f["sensitivity"]),
            NO_THRESHOLD if "threshold_note" in f else _num(f["specificity"]),
            _num(f["ece"]),
        ]
        for f in report["findings"]
    ]


def _threshold_notes(report: dict[str, Any]) -> list[str]:
    return [f"{f['finding']}: {f['threshold_note']}" for f in report["findings"] if "threshold_note" in f]


HEADER = ["finding", "pos", "neg", "AUROC", "95% CI", "threshold", "sensitivity", "specificity", "ECE"]


def _summary_lines(report: dict[str, Any]) -> list[str]:
    m, d, s = report["model"], report["dataset"], report["settings"]
    return [
        f"Model: {m['name']} version {m['version']} ({m['architecture']}), "
        f"untrained: {'YES' if m['untrained'] else 'no'}",
        f"Dataset: {d['images']} images, sha256 {d['sha256']} (labels {d['labels']}, format {d['label_format']})",
        f"AUROC 95% CI: {s['ci']}, {s['bootstrap']} resamples, random generator seed {s['random_seed']}; "
        f"ECE over {s['ece_bins']} equal-width probability bins; sensitivity/specificity at the threshold the "
        "service applied.",
        f"Macro AUROC (estimable findings): {_num(report['macro_auroc'])}",
    ]


def _chosen_rows(report: dict[str, Any]) -> list[list[str]]:
    c = report["chosen_thresholds"]
    return [
        [label, f"{v['threshold']:.6g}", _num(v["sensitivity"]), _num(v["specificity"])]
        for label, v in c["thresholds"].items()
    ]


def to_markdown(report: dict[str, Any], *, plots: bool = True) -> str:
    lines = [f"# Evaluation of {report['model']['name']}", "", f"**{report['status']}**", ""]
    lines += [f"> **{n}**" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"- {line}" for line in _summary_lines(report)] + [""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in finding_rows(report)]
    for note in _threshold_notes(report):
        lines += ["", f"> {note}"]
    if report["not_evaluated"]:
        lines += ["", f"Not in the labels (not evaluated): {', '.join(report['not_evaluated'])}"]
    if "chosen_thresholds" in report:
        c = report["chosen_thresholds"]
        lines += ["", f"## Chosen thresholds ({c['rule']})", "", f"> {c['measured_on']}", ""]
        lines += ["| finding | threshold | sensitivity | specificity |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in _chosen_rows(report)]
        lines += [f"\n> **{note}**" for note in c.get("notes", {}).values()]
        if c["skipped"]:
            lines += ["", f"No threshold chosen (need both classes): {', '.join(c['skipped'])}"]
    if plots:
        lines += ["", "## Reliability", ""]
        names = plot_files([f["finding"] for f in report["findings"]])
        lines += [f"![{f['finding']}]({names[f['finding']]})" for f in report["findings"]]
    return "\n".join(lines) + "\n"


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def status_html(report: dict[str, Any]) -> str:
    return f'<p class="status"><strong>{html.escape(report["status"])}</strong></p>'


STYLE = (
    "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px}.note{background:#fee;padding:.5em}"
    ".status{background:#fdd;border:2px solid #c00;padding:.5em}img{margin:4px}</style>"
)


def to_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One page, no external resources: the plots are data: URIs."""
    notes = "".join(f'<p class="note"><strong>{html.escape(n)}</strong></p>' for n in report["notes"])
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary_lines(report))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation of {html.escape(report['model']['name'])}</title>",
        STYLE,
        "</head><body>",
        f"<h1>Evaluation of {html.escape(report['model']['name'])}</h1>",
        status_html(report),
        notes,
        f"<ul>{summary}</ul>",
        table_html(HEADER, finding_rows(report)),
        *(f'<p class="note">{html.escape(n)}</p>' for n in _threshold_notes(report)),
    ]
    if "chosen_thresholds" in report:
        c = report["chosen_thresholds"]
        parts += [
            f"<h2>Chosen thresholds ({html.escape(c['rule'])})</h2>",
            f'<p class="note">{html.escape(c["measured_on"])}</p>',
            table_html(["finding", "threshold", "sensitivity", "specificity"], _chosen_rows(report)),
            *(f'<p class="note"><strong>{html.escape(n)}</strong></p>' for n in c.get("notes", {}).values()),
        ]
    parts.append("<h2>Reliability</h2><div>")
    for label, png in pngs.items():
        data = base64.b64encode(png).decode()
        parts.append(f'<img alt="{html.escape(label)}" src="data:image/png;base64,{data}">')
    parts.append("</div></body></html>")
    return "".join(parts)


def write_evaluation_json(report: dict[str, Any], path: Path) -> None:
    """report.json alone: rewritten once the model-card recording has an outcome."""
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


def write_evaluation(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md, report.html, one reliability PNG per finding and, when thresholds were
    chosen, thresholds-<model>-<version>.json; returns the paths by kind. A segmentation report
    (`report["task"]`) is written by segmentation_report.py."""
    if report.get("task") == "segmentation":
        from cxr_client.segmentation_report import write_segmentation_evaluation

        return write_segmentation_evaluation(report, out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {f["finding"]: reliability_png(f) for f in report["findings"]}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_evaluation_json(report, paths["json"])
    paths["markdown"].write_text(to_markdown(report), encoding="utf-8")
    paths["html"].write_text(to_html(report, pngs), encoding="utf-8")
    names = plot_files(list(pngs))
    for label, png in pngs.items():
        (out / names[label]).write_bytes(png)
    if "chosen_thresholds" in report:
        m = report["model"]
        path = out / f"thresholds-{_safe(m['name'])}-{_safe(m['version'])}.json"
        path.write_text(json.dumps(threshold_file(report), indent=2), encoding="utf-8")
        paths["thresholds"] = path
    return paths
