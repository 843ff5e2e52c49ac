"""bench/stack.py's ceiling: the batched in-process forward and the per-image work around it."""

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_ceiling_with_a_batch_larger_than_the_image_set(tmp_path, task_name):
    """A GPU-sized batch (32) over 16 images crashed the finish timing (IndexError), on the first GPU run."""
    import stack
    from _common import nih_pngs
    from _peers import task_named, write_settings

    args = stack.parse_args(["--quick", "--max-batch-size", "5", "--images", "2", "--requests", "10", "--seconds",
                             "1", "--input-size", "32", "--seg-input-size", "32"])  # fmt: skip
    task = task_named(task_name)
    config = write_settings(task, stack.options(args), tmp_path)
    result = stack.ceiling(task, config, nih_pngs(args.images), args)
    assert result["batch_size"] == 5 and result["images"] >= 5
    assert result["img_per_s"] > 0 and result["finish_p50_ms"] > 0 and result["prepare_p50_ms"] > 0
