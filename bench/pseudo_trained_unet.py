"""A segmentation checkpoint briefly trained, at bench or test time, on pseudo-masks that a classical method draws
on the shared NIH images: random-init weights give near-empty or speckled masks whose Dice moves with a handful of
pixels, so the load-time Dice check would judge noise; a trained network's compact masks let it judge the runtime.

The pseudo-masks are not anatomy (no reference masks ship with the data): dark regions away from the border in
each image half stand in for the lungs, a bright central-lower region for the heart, bright upper bands for the
clavicles. Nothing is downloaded; the checkpoint is written under a cache folder keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CLASSES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")


@dataclass(frozen=True)
class PseudoTraining:
    """What the checkpoint is made from: network, input size, images, steps (the cache key is all of it)."""

    architecture: str = "Unet"
    encoder: str = "resnet34"
    input_size: int = 256
    steps: int = 40  # at train_size, then final_steps at input_size: most of the work at a quarter of the pixels
    batch: int = 8
    train_size: int = 128
    final_steps: int = 10
    final_batch: int = 4
    learning_rate: float = 3e-3
    seed: int = 0
    recipe: str = "1"


def pseudo_masks(pixels: np.ndarray) -> np.ndarray:
    """5 x H x W bool masks (CLASSES order) of one H x W image in [0, 1]: per region of the image, the pixels
    beyond a percentile of that region, opened, the largest connected part kept and its holes filled.
    Deterministic, never empty, compact, and dependent on the image."""
    from scipy import ndimage

    img = ndimage.gaussian_filter(pixels.astype(np.float32), sigma=max(1.0, pixels.shape[0] / 128))
    h, w = img.shape
    rows, cols = np.mgrid[0:h, 0:w]
    lung_rows = (rows >= 0.12 * h) & (rows < 0.9 * h)
    right_half = lung_rows & (cols >= 0.08 * w) & (cols < 0.48 * w)  # the patient's right is the image's left
    left_half = lung_rows & (cols >= 0.52 * w) & (cols < 0.92 * w)
    heart_box = ((rows - 0.66 * h) / (0.2 * h)) ** 2 + ((cols - 0.55 * w) / (0.2 * w)) ** 2 <= 1
    band = (rows >= 0.1 * h) & (rows < 0.3 * h)
    right_band = band & (cols >= 0.1 * w) & (cols < 0.45 * w)
    left_band = band & (cols >= 0.55 * w) & (cols < 0.9 * w)
    return np.stack(
        [
            _region(img, left_half, 35, dark=True),
            _region(img, right_half, 35, dark=True),
            _region(img, heart_box, 45, dark=False),
            _region(img, left_band, 70, dark=False),
            _region(img, right_band, 70, dark=False),
        ]
    )


def _region(img: np.ndarray, where: np.ndarray, percentile: float, *, dark: bool) -> np.ndarray:
    from scipy import ndimage

    cut = np.percentile(img[where], percentile)
    picked = where & ((img <= cut) if dark else (img >= cut))
    opened = ndimage.binary_opening(picked, iterations=2)
    picked = opened if opened.any() else picked
    labels, n = ndimage.label(picked)
    if n > 1:
        sizes = ndimage.sum_labels(picked, labels, index=range(1, n + 1))
        picked = labels == 1 + int(np.argmax(sizes))
    return np.asarray(ndimage.binary_fill_holes(picked))


def cache_key(spec: PseudoTraining, images: Sequence[Path]) -> str:
    import segmentation_models_pytorch as smp
    import torch

    parts = {"spec": asdict(spec), "images": sorted(p.name for p in images), "torch": torch.__version__,
             "smp": smp.__version__}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_checkpoint(spec: PseudoTraining, images: Sequence[Path], cache_dir: Path) -> Path:
    """The checkpoint (a state_dict file) for `spec` trained on `images`, made once per cache key."""
    path = cache_dir / f"pseudo-unet-{spec.encoder}-{spec.input_size}-{cache_key(spec, images)}.pt"
    if path.is_file():
        return path
    import segmentation_models_pytorch as smp

    from cxr_serving.images import decode_image

    started = time.perf_counter()
    decoded = [decode_image(p.read_bytes()).pixels for p in images]
    torch.manual_seed(spec.seed)
    net = smp.create_model(spec.architecture, encoder_name=spec.encoder, encoder_weights=None, in_channels=3,
                           classes=len(CLASSES))  # fmt: skip
    gen = torch.Generator().manual_seed(spec.seed)
    loss = 0.0
    phases = [
        (spec.train_size, spec.steps, spec.batch, spec.learning_rate),
        (spec.input_size, spec.final_steps, spec.final_batch, spec.learning_rate / 3),  # adapt to the served size
    ]
    for size, steps, batch, lr in phases:
        if steps:
            loss = _train(net, _examples(decoded, size), steps, batch, lr, gen)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.rename(path)
    log.info("pseudo-trained checkpoint %s in %.1f s (final loss %.4f)", path, time.perf_counter() - started, loss)
    return path


def _examples(decoded: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs (as the service preprocesses) and pseudo-masks at `size`."""
    import torch.nn.functional as F

    from cxr_segmentation.preprocessing import Preprocess

    prep = Preprocess(size, 3, "imagenet")
    xs, ys = [], []
    for pixels in decoded:
        full = torch.from_numpy(np.asarray(pixels, np.float32))[None, None]
        small = F.interpolate(full, size=(size, size), mode="area")
        gray = small[0, 0].numpy()
        xs.append(prep(pixels))
        ys.append(torch.from_numpy(pseudo_masks(gray)).float())
    return torch.stack(xs), torch.stack(ys)


def _train(
    net: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, lr: float,
    gen: torch.Generator,
) -> float:  # fmt: skip
    """`steps` of AdamW (one-cycle learning rate) on BCE + soft Dice; returns the last loss."""
    import torch.nn.functional as F

    x_all, y_all = data
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    value = 0.0
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=gen)
        logits = net(x_all[idx])
        target = y_all[idx]
        prob = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (prob * target).sum((2, 3)) + 1) / (prob.sum((2, 3)) + target.sum((2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + soft_dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        if step % 10 == 0 or step == steps - 1:
            log.info("pseudo-training %d px step %d/%d loss %.4f", x_all.shape[-1], step + 1, steps, value)
    net.eval()
    return value
