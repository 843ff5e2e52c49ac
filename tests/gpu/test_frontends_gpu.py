"""Two frontend processes feeding one executor whose model runs on CUDA (skipped without a GPU): every answer is
bit-equal to the single-process server's on the same device, and the model reports `cuda`."""

from __future__ import annotations

from pathlib import Path

from tests.support.cuda import NEEDS_CUDA
from tests.support.frontend_classify import check_two_frontends_bit_equal_to_one_process

pytestmark = NEEDS_CUDA


def test_two_frontends_answer_bit_equal_to_one_process_on_cuda(tmp_path: Path) -> None:
    check_two_frontends_bit_equal_to_one_process(tmp_path, "cuda")
