"""bench/stack.py's ceiling: the batched in-process forward and the per-image work around it."""

import pytest

from bench import stack
from bench._common import nih_pngs
from bench._peers import load_settings_file, task_named, write_settings

ARGS = ["--quick", "--max-batch-size", "5", "--images", "2", "--requests", "10", "--seconds", "1",
        "--input-size", "32", "--seg-input-size", "32"]  # fmt: skip


@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_ceiling_with_a_batch_larger_than_the_image_set(tmp_path, task_name):
    """A GPU-sized batch (32) over 16 images crashed the finish timing (IndexError), on the first GPU run."""
    args = stack.parse_args(ARGS)
    task = task_named(task_name)
    config = write_settings(task, stack.options(args), tmp_path)
    result = stack.ceiling(task, config, nih_pngs(args.images), args)
    assert result["batch_size"] == 5 and result["images"] >= 5
    assert result["img_per_s"] > 0 and result["finish_p50_ms"] > 0 and result["prepare_p50_ms"] > 0


@pytest.mark.parametrize("encoding", ["png", "rle", "none"])
def test_segmentation_mask_work_per_encoding(tmp_path, encoding):
    """The per-image mask work in each encoding (bench/segmentation.py's raw_mask_work_ms_per_image before
    stack.py replaced it): the ceiling times `finish`, and `finish` answers in the encoding asked for."""
    args = stack.parse_args([*ARGS, "--mask-encoding", encoding])
    task = task_named("segmentation", args.mask_encoding)
    config = write_settings(task, stack.options(args), tmp_path)
    pngs = nih_pngs(args.images)
    result = stack.ceiling(task, config, pngs, args)
    assert result["finish_p50_ms"] > 0 and result["img_per_s"] > 0
    model = task.load(load_settings_file(str(config)))
    try:
        ctx, item = task.prepare(model, pngs[0])
        masks = task.finish(model, ctx, model.predict([item])[0]).masks
        labels = list(model.labels)
    finally:
        model.unload()
    assert [m.label for m in masks] == labels
    assert all(bool(m.png) == (encoding == "png") and bool(m.rle.counts) == (encoding == "rle") for m in masks)
