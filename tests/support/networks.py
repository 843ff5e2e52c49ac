"""Small torch networks for the optimisation tests, shared by the CPU (tests/unit) and CUDA (tests/gpu) cases."""

from __future__ import annotations

from torch import nn


def small_cnn() -> nn.Module:
    """Two convolutions and a pooled head: enough for channels_last, AMP and CUDA graphs to apply."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
