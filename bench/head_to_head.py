"""Our services against LitServe where it is closest, with long cells (`make bench-head_to_head`).

bench/stack.py with only the peers that matter for the "ahead of LitServe at every concurrency >= 8"
target, at concurrency 8 and 32, 6 rotating rounds of 7.5 s per peer (45 s per peer and level):
  service          our service (settings as in stack.py, BatchNorm folding on: the platform's default)
  litserve         LitServe serving the network as it loads (what a LitServe user would write)
  litserve_folded  LitServe serving our folded network (the serving paths alone, model work equal)
Besides the totals it reports the ratio within each round (`*_by_round`, `*_won_rounds`): a host's
slow minute then hits both sides of a pair. ~25 min on 2 CPU cores; `--quick` ~5 min.
Writes bench/results/head_to_head.json (head_to_head-quick.json with --quick).
"""

from __future__ import annotations

import sys

from _common import RESULTS
from stack import main as stack_main


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    out = RESULTS / ("head_to_head-quick.json" if quick else "head_to_head.json")
    long = [] if quick else ["--rounds", "6", "--seconds", "45", "--requests", "1200"]
    return stack_main(
        ["--peers", "service,litserve,litserve_folded", "--concurrency", "8,32", *long, "--out", str(out), *args]
    )


if __name__ == "__main__":
    sys.exit(main())
