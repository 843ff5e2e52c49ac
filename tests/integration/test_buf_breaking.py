"""`make buf`'s breaking check (scripts/buf_breaking.sh) in scratch git repositories holding a copy
of protos/ and the script: a removed field fails it, an added field passes, on main (against
HEAD~1, as in CI's clean clone) and on a branch (against the merge-base, every commit of the branch)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import REPO

SCRIPT = REPO / "scripts" / "buf_breaking.sh"
BUF = REPO / "node_modules" / ".bin" / "buf"
COMMON = Path("protos/cxr/common/v1/common.proto")
FIELD = "  string content_type = 2;\n"  # cxr.common.v1.Image.content_type

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make` (node_modules)")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull}
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    return subprocess.run([*cmd, *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def breaking(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "BUF_BREAKING_AGAINST"} | {"BUF": str(BUF), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=repo, env=full_env, capture_output=True, text=True, timeout=120
    )


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / COMMON
    text = path.read_text()
    assert text.count(old) == 1, f"{COMMON} changed: expected one {old!r}"
    path.write_text(text.replace(old, new))


def remove_field(repo: Path) -> None:
    edit(repo, FIELD, "")


def add_field(repo: Path) -> None:
    edit(repo, FIELD, FIELD + "  string source_note = 99;\n")


@pytest.fixture
def landed(tmp_path) -> Path:
    """A repository on main whose only commit holds today's protos."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copytree(REPO / "protos", repo / "protos")
    (repo / "scripts").mkdir()
    shutil.copy2(SCRIPT, repo / "scripts")
    commit_all(repo, "the API contract")
    return repo


def assert_fails_on_the_field(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "content_type" in out and "Image" in out, out


def test_make_buf_fails_on_a_removed_field_in_a_clean_clone_of_main(landed, tmp_path):
    """What CI runs (`make buf`, the Makefile's own recipe) where CI runs it: a fresh clone of main."""
    remove_field(landed)
    commit_all(landed, "drop Image.content_type")
    clone = tmp_path / "ci"
    git(tmp_path, "clone", "-q", str(landed), str(clone))
    result = subprocess.run(
        ["make", "-f", str(REPO / "Makefile"), "-o", "node_modules/.installed", "buf", f"BUF={BUF}"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_fails_on_the_field(result)  # the recipe of 25542d3 compared main with itself and passed
    assert "(HEAD~1)" in result.stdout, result.stdout


def test_an_added_field_passes(landed):
    add_field(landed)
    commit_all(landed, "add Image.source_note")
    result = breaking(landed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(HEAD~1)" in result.stdout, result.stdout


def test_a_branch_is_checked_from_its_merge_base_not_only_its_last_commit(landed):
    git(landed, "checkout", "-q", "-b", "feature")
    remove_field(landed)
    commit_all(landed, "drop Image.content_type")
    (landed / "notes.txt").write_text("a later commit that does not touch protos\n")
    commit_all(landed, "notes")
    result = breaking(landed)
    assert "merge-base with main" in result.stdout, result.stdout
    assert_fails_on_the_field(result)
    assert breaking(landed, "--against", "HEAD~1").returncode == 0  # the last commit alone is harmless


def test_an_uncommitted_removal_fails(landed):
    (landed / "notes.txt").write_text("a second commit, so that HEAD~1 exists\n")
    commit_all(landed, "notes")
    remove_field(landed)
    assert_fails_on_the_field(breaking(landed))


def test_an_explicit_baseline_and_the_missing_baseline_cases(landed, tmp_path):
    first = git(landed, "rev-parse", "HEAD").strip()
    result = breaking(landed)  # the first commit: nothing to compare against
    assert result.returncode == 0 and "first commit" in result.stdout, result.stdout + result.stderr
    remove_field(landed)
    commit_all(landed, "drop Image.content_type")
    (landed / "notes.txt").write_text("x\n")
    commit_all(landed, "notes")
    assert_fails_on_the_field(breaking(landed, BUF_BREAKING_AGAINST=first))  # e.g. the previous tip CI saw
    assert breaking(landed, "--against", "no-such-ref").returncode == 2
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{landed}", str(shallow))
    result = breaking(shallow)
    assert result.returncode == 2 and "shallow" in result.stderr, result.stdout + result.stderr
