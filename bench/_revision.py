"""The source a benchmark ran from, recorded in its JSON so that a result can be traced to its code."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def source_revision(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": HEAD's sha, "dirty": whether tracked files differ from it}; both None outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if changed is None else bool(changed.strip())}
