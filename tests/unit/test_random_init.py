"""Untrained weights drawn in threads at once are the same as drawn alone (torch's generator is global)."""

from __future__ import annotations

import threading
import time

import torch

from cxr_serving.random_init import fixed_random_weights


def _draw(out: list[torch.Tensor]) -> None:
    with fixed_random_weights(0):
        parts = []
        for _ in range(50):
            parts.append(torch.rand(4))
            time.sleep(0.001)  # another builder would run here and take draws from the shared generator
        out.append(torch.cat(parts))


def test_concurrent_builds_draw_what_a_lone_build_draws() -> None:
    alone: list[torch.Tensor] = []
    _draw(alone)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=_draw, args=(results,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    assert all(torch.equal(r, alone[0]) for r in results)
    state = torch.random.get_rng_state()
    with fixed_random_weights(0):
        torch.rand(10)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
