"""A StudyReport as JSON, Markdown and a self-contained HTML page (overlay image embedded)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cxr_client.analyze import NO_OPERATING_POINT, ReportFinding, StudyReport

OVERLAY_FILE = "overlay.png"
NO_OPERATING_POINT_NOTE = (
    "Findings with threshold 'none (no operating point)': the checkpoint has no operating point for them; "
    "their probabilities are raw model outputs, not comparable with the calibrated ones, and never called positive."
)


def to_json(report: StudyReport, *, indent: int | None = 2) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=indent, ensure_ascii=False)


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def threshold_text(f: ReportFinding) -> str:
    """The threshold cell: the number, or why there is none."""
    if f.threshold is not None:
        return f"{f.threshold:.3f}"
    return "none (no operating point)" if f.calibration == NO_OPERATING_POINT else "none"


def heatmap_file(label: str) -> str:
    return "heatmap_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in label) + ".png"


def to_markdown(report: StudyReport, *, overlay_path: str | None = None, heatmap_links: bool = False) -> str:
    """Markdown; `overlay_path` (relative to the .md file) links the overlay image when given, and
    `heatmap_links` the heatmap_<label>.png files that `write_report` writes next to it."""
    lines = [f"# Chest X-ray study report: {report.study}", "", f"> **{report.disclaimer}**", ""]
    for w in report.warnings:
        lines.append(f"> ⚠️ {w}")
    if report.warnings:
        lines.append("")
    img = report.image
    if img:
        lines.append(
            f"Image: {img.get('width')}×{img.get('height')} {img.get('format', '')} · generated {report.generated_at}"
        )
        lines.append("")
    lines += ["## Findings", ""]
    if report.findings:
        lines += ["| finding | probability | threshold | positive | model |", "|---|---:|---:|:---:|---|"]
        lines += [
            f"| {_md_cell(f.label)} | {f.probability:.3f} | {threshold_text(f)} | {'**yes**' if f.positive else 'no'} "
            f"| {_md_cell(f.model)} |"
            for f in report.findings
        ]
        positives = ", ".join(report.positive_findings) or "none"
        lines += ["", f"Positive at the model thresholds: **{positives}**", ""]
        if any(f.calibration == NO_OPERATING_POINT for f in report.findings):
            lines += [NO_OPERATING_POINT_NOTE, ""]
        if heatmap_links:
            lines += [f"![Grad-CAM {label}]({heatmap_file(label)})" for label in report.heatmaps]
            lines += [""] if report.heatmaps else []
    else:
        lines += ["No classification results.", ""]
    lines += ["## Measurements", ""]
    m = report.measurements
    if m is None:
        lines += ["No segmentation results.", ""]
    else:
        if m.cardiothoracic_ratio is not None:
            lines.append(f"- Cardiothoracic ratio: **{m.cardiothoracic_ratio:.3f}** — {m.note}")
        elif m.cardiothoracic_ratio_implausible:
            lines.append(
                f"- Cardiothoracic ratio: implausible, not reported ({m.cardiothoracic_ratio_unavailable_reason})"
            )
        else:
            lines.append(f"- Cardiothoracic ratio: not computable ({m.cardiothoracic_ratio_unavailable_reason or '-'})")
        lines.append(
            f"- Heart width: {m.heart_width_px:.0f} px" + (f" ({m.heart_width_mm:.0f} mm)" if m.heart_width_mm else "")
        )
        lines.append(
            f"- Thorax width: {m.thorax_width_px:.0f} px"
            + (f" ({m.thorax_width_mm:.0f} mm)" if m.thorax_width_mm else "")
        )
        if m.spacing_source:
            lines.append(f"- Sizes in mm from {m.spacing_source}")
        for a in report.anatomy:
            area = f"{a.area_pixels} px" + (f", {a.area_mm2:.0f} mm²" if a.area_mm2 else "")
            lines.append(f"- {a.label.replace('_', ' ')}: {area}")
        lines.append("")
    if overlay_path:
        lines += [f"![segmentation overlay]({overlay_path})", ""]
    lines += ["## Literature", ""]
    if report.literature:
        for ref in report.literature:
            title = ref.title or ref.source or ref.passage_id
            src = f" ({ref.source})" if ref.source and ref.title else ""
            findings = ", ".join(f"*{f}*" for f in [ref.finding, *ref.also_for])
            lines.append(f"[{ref.number}] **{_md_cell(title)}**{src} — for {findings}: {ref.excerpt}")
            lines.append("")
    elif not report.literature_notes:
        lines += ["No literature retrieved (no positive findings, or the literature service was unavailable).", ""]
    for finding, note in report.literature_notes.items():
        lines += [f"*{finding}*: {note}.", ""]
    lines += ["## Models", "", "| service | model | version | architecture | untrained |", "|---|---|---|---|:---:|"]
    lines += [
        f"| {m.service} | {m.name} | `{m.version}` | {m.architecture} | {'**yes**' if m.untrained else 'no'} |"
        for m in report.models
    ]
    lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.disclaimer{border:2px solid #b00;background:#fee;padding:.75rem;font-weight:600}
.warning{border-left:4px solid #e90;background:#fff6e5;padding:.5rem .75rem;margin:.5rem 0}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.pos{background:#fdecea}
img.overlay{max-width:100%;border:1px solid #ccc}
"""


def to_html(report: StudyReport) -> str:
    """One self-contained page: the overlay PNG is embedded as a data URI."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>CXR report: {e(report.study)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Chest X-ray study report: {e(report.study)}</h1>",
        f"<p class='disclaimer'>{e(report.disclaimer)}</p>",
        *(f"<p class='warning'>⚠️ {e(w)}</p>" for w in report.warnings),
        f"<p>Generated {e(report.generated_at)}; image {e(json.dumps(report.image))}</p>",
        "<h2>Findings</h2>",
    ]
    if report.findings:
        parts.append(
            "<table><tr><th>finding</th><th>probability</th><th>threshold</th><th>positive</th><th>model</th></tr>"
        )
        for f in report.findings:
            cls = " class='pos'" if f.positive else ""
            parts.append(
                f"<tr{cls}><td>{e(f.label)}</td><td class='num'>{f.probability:.3f}</td>"
                f"<td class='num'>{e(threshold_text(f))}</td><td>{'yes' if f.positive else 'no'}</td>"
                f"<td>{e(f.model)}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No classification results.</p>")
    for label, png in report.heatmaps.items():
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<figure style='display:inline-block'><img class='heatmap' width='192' alt='Grad-CAM {e(label)}' "
            f"src='data:image/png;base64,{b64}'><figcaption>Grad-CAM: {e(label)}</figcaption></figure>"
        )
    parts.append("<h2>Measurements</h2>")
    m = report.measurements
    if m is None:
        parts.append("<p>No segmentation results.</p>")
    else:
        if m.cardiothoracic_ratio is not None:
            ctr = f"<b>{m.cardiothoracic_ratio:.3f}</b> — {e(m.note)}"
        elif m.cardiothoracic_ratio_implausible:
            ctr = f"implausible, not reported ({e(m.cardiothoracic_ratio_unavailable_reason)})"
        else:
            ctr = f"not computable ({e(m.cardiothoracic_ratio_unavailable_reason or '-')})"
        parts.append(f"<ul><li>Cardiothoracic ratio: {ctr}</li>")
        parts += [f"<li>{e(a.label.replace('_', ' '))}: {a.area_pixels} px</li>" for a in report.anatomy]
        if m.spacing_source:
            parts.append(f"<li>Sizes in mm from {e(m.spacing_source)}</li>")
        parts.append("</ul>")
    if report.overlay_png:
        b64 = base64.b64encode(report.overlay_png).decode()
        parts.append(f"<img class='overlay' alt='segmentation overlay' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Literature</h2>")
    if report.literature:
        parts.append("<ol>")
        for ref in report.literature:
            parts.append(
                f"<li value='{ref.number}'><b>{e(ref.title or ref.source or ref.passage_id)}</b> "
                f"{e(ref.source if ref.title else '')} "
                f"— for {', '.join(f'<i>{e(f)}</i>' for f in [ref.finding, *ref.also_for])}: {e(ref.excerpt)}</li>"
            )
        parts.append("</ol>")
    elif not report.literature_notes:
        parts.append("<p>No literature retrieved.</p>")
    parts += [f"<p><i>{e(finding)}</i>: {e(note)}.</p>" for finding, note in report.literature_notes.items()]
    parts.append("<h2>Models</h2><table><tr><th>service</th><th>model</th><th>version</th><th>untrained</th></tr>")
    parts += [
        f"<tr><td>{e(v.service)}</td><td>{e(v.name)}</td><td><code>{e(v.version)}</code></td>"
        f"<td>{'<b>yes</b>' if v.untrained else 'no'}</td></tr>"
        for v in report.models
    ]
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(report: StudyReport, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.html (and overlay.png when there is one) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    overlay = None
    if report.overlay_png:
        paths["overlay"] = out / OVERLAY_FILE
        paths["overlay"].write_bytes(report.overlay_png)
        overlay = OVERLAY_FILE
    for label, png in report.heatmaps.items():
        paths[f"heatmap:{label}"] = out / heatmap_file(label)
        paths[f"heatmap:{label}"].write_bytes(png)
    paths["json"].write_text(to_json(report), encoding="utf-8")
    paths["markdown"].write_text(to_markdown(report, overlay_path=overlay, heatmap_links=True), encoding="utf-8")
    paths["html"].write_text(to_html(report), encoding="utf-8")
    return paths
