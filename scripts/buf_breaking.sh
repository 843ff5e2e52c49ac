#!/usr/bin/env bash
# buf breaking for protos/: the working tree's protos against the last landed contract.
#
# The baseline commit, first rule that applies:
#   1. $BUF_BREAKING_AGAINST (or --against REF): an explicit commit, e.g. the previous tip CI saw
#      (GitHub: github.event.before), so a push of several commits is checked as a whole.
#   2. On a branch that forked from main (main or origin/main): the merge-base, so every commit of
#      the branch is checked, not only the last.
#   3. Otherwise (HEAD is main's tip, as in CI's clean clone of main): HEAD~1, the first parent,
#      which is the previous tip after a merge commit; after a fast-forward of several commits
#      only the last one is checked (use rule 1 to cover them all).
# The baseline's protos are extracted with `git archive` (works in worktrees and at any depth);
# a shallow clone without the baseline commit is an error, not a skip.
set -euo pipefail

usage() { echo "usage: $0 [--against GIT_REF]" >&2; exit 2; }
against="${BUF_BREAKING_AGAINST:-}"
while (($#)); do
    case "$1" in
        --against) (($# >= 2)) || usage; against="$2"; shift 2 ;;
        *) usage ;;
    esac
done

root="$(git rev-parse --show-toplevel)"
cd "$root"
buf="${BUF:-$root/node_modules/.bin/buf}"

commit_of() { git rev-parse --verify --quiet "$1^{commit}"; }

if [[ -n "$against" ]]; then
    base="$(commit_of "$against")" || { echo "buf breaking: cannot resolve --against '$against'" >&2; exit 2; }
    why="given ($against)"
else
    head="$(git rev-parse HEAD)"
    base="" why=""
    for main in main origin/main; do
        main_commit="$(commit_of "$main")" || continue
        fork="$(git merge-base HEAD "$main_commit" 2>/dev/null)" || continue
        if [[ "$fork" != "$head" ]]; then
            base="$fork" why="merge-base with $main"
        fi
        break
    done
    if [[ -z "$base" ]]; then
        if base="$(commit_of HEAD~1)"; then
            why="HEAD~1"
        elif [[ "$(git rev-parse --is-shallow-repository)" == "true" ]]; then
            echo "buf breaking: shallow clone without HEAD~1; fetch full history (git fetch --unshallow)" >&2
            exit 2
        else
            echo "buf breaking: HEAD is the first commit, nothing to compare against"
            exit 0
        fi
    fi
fi

if ! git cat-file -e "$base:protos/buf.yaml" 2>/dev/null; then
    echo "buf breaking: ${base:0:12} ($why) has no protos/buf.yaml, nothing to compare against"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git archive "$base" protos | tar -x -C "$tmp"
echo "buf breaking: protos/ against ${base:0:12} ($why)"
"$buf" breaking protos --against "$tmp/protos"
