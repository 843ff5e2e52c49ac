"""Write what the service catalog (libs/serving/src/cxr_serving/services.json) decides outside Python.

    python scripts/gen_catalog.py          # rewrite the files below from the catalog
    python scripts/gen_catalog.py --check  # exit 1 if one is stale (make lint)

- libs/client/src/cxr_client/services.json: the client's copy (the client installs without cxr_serving);
- deploy/monitoring/alerts.yml: the job pattern of CxrServiceDown names every catalog service.
The Helm chart reads the catalog itself (deploy/helm/cxr/files/services.json links to it), and
scripts/gen_chart_schema.py takes the service names of values.schema.json from it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cxr_serving.catalog import Catalog, load_catalog

ROOT = Path(__file__).resolve().parent.parent
CLIENT_COPY = ROOT / "libs/client/src/cxr_client/services.json"
ALERTS = ROOT / "deploy/monitoring/alerts.yml"
_SERVICE_DOWN = re.compile(r'(expr: up\{job=~"\.\*\()[^)]*(\)\.\*"\} == 0)')


def client_copy(catalog: Catalog) -> str:
    return json.dumps(catalog.to_json(), indent=2) + "\n"


def alerts(catalog: Catalog, current: str) -> str:
    """alerts.yml with CxrServiceDown's job pattern set to the catalog's services."""
    fresh, n = _SERVICE_DOWN.subn(lambda m: m.group(1) + "|".join(catalog) + m.group(2), current)
    if n != 1:
        raise SystemExit(f'{ALERTS}: expected one CxrServiceDown `up{{job=~".*(...).*"}} == 0` rule, found {n}')
    return fresh


def stale(catalog: Catalog, client_path: Path = CLIENT_COPY, alerts_path: Path = ALERTS) -> dict[Path, str]:
    """The files whose committed text differs from what the catalog gives, with their fresh text."""
    want = {
        client_path: client_copy(catalog),
        alerts_path: alerts(catalog, alerts_path.read_text(encoding="utf-8")),
    }
    return {p: text for p, text in want.items() if not p.exists() or p.read_text(encoding="utf-8") != text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = ap.parse_args()
    out = stale(load_catalog())  # the platform's catalog only: extra catalog files are deployment data
    if args.check:
        for path in out:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/gen_catalog.py", file=sys.stderr)
        return 1 if out else 0
    for path, text in out.items():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
