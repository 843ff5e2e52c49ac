"""Grad-CAM (Selvaraju et al. 2017) on the last feature map, encoded as an 8-bit grayscale PNG."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from cxr_classification.networks import ClassifierNetwork


def grad_cam(network: ClassifierNetwork, image: torch.Tensor, head_indices: list[int]) -> list[np.ndarray]:
    """One heatmap in [0, 1] (S x S, the input size) per head output index, for one C x S x S image."""
    size = image.shape[-2:]
    with torch.inference_mode(False), torch.enable_grad():
        x = image[None].detach().clone().float().requires_grad_(True)
        feats = network.features(x)
        logits = network.head(feats)
        maps = []
        for i, idx in enumerate(head_indices):
            (grads,) = torch.autograd.grad(logits[0, idx], feats, retain_graph=i < len(head_indices) - 1)
            f, g = feats, grads
            if network.features_channels_last:  # timm transformers: B x H x W x C
                f, g = feats.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
            weights = g.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * f).sum(dim=1, keepdim=True)).detach()
            cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
            peak = float(cam.max())
            maps.append((cam / peak if peak > 0 else cam).cpu().numpy())
    return maps


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """[0, 1] float map -> 8-bit grayscale PNG bytes (white = most evidence)."""
    data = (np.clip(heatmap, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data, mode="L").save(buf, format="PNG")
    return buf.getvalue()
