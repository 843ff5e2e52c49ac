"""The marks of every test in tests/gpu: `gpu` (`pytest -m gpu` selects them), skipped where torch sees no CUDA."""

from __future__ import annotations

import pytest
import torch

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
