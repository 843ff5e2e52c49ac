"""Reproducible random weights: an untrained model must get the same weights in every instance and on every
reload, and torch's global generator is shared by the threads that build models at once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def fixed_random_weights(random_state: int) -> Iterator[None]:
    """Run the block alone, with torch's CPU generator set to `random_state`, and restore the generator after."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        yield
