"""Regenerate the parameter tables of deploy/helm/cxr/README.md from the `## @section` and
`## @param` comments of values.yaml (Bitnami readme-generator style), or check they are current.

    python scripts/gen_chart_readme.py          # rewrite the tables
    python scripts/gen_chart_readme.py --check  # exit 1 when README.md is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "cxr"
START, END = "<!-- parameters:start -->", "<!-- parameters:end -->"
LINE = re.compile(r"^## @(section|param) (.+)$")


def _default(values: dict[str, Any], dotted: str) -> str:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    text = json.dumps(node, separators=(", ", ": "))
    if len(text) > 60:
        text = text[:57] + "..."
    return "`" + text.replace("|", "\\|") + "`"


def tables(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    out: list[str] = []
    for line in values_text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        if m.group(1) == "section":
            out += ["", f"### {m.group(2)}", "", "| name | description | default |", "|---|---|---|"]
        else:
            name, _, desc = m.group(2).partition(" ")
            out.append(f"| `{name}` | {desc.replace('|', '/')} | {_default(values, name)} |")
    return "\n".join(out).strip() + "\n"


def render(readme: str, values_text: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{tables(values_text)}{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    fresh = render(readme, (CHART / "values.yaml").read_text())
    if args.check:
        if fresh != readme:
            print(f"{readme_path} is stale: run python scripts/gen_chart_readme.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
