"""Build the segmentation network described by the config, always without downloading weights."""

from __future__ import annotations

import torch
from torch import nn

from cxr_segmentation.config import SegmentationConfig
from cxr_serving.errors import CheckpointError


def build_network(cfg: SegmentationConfig) -> nn.Module:
    """A freshly initialised network: smp (`architecture` + `encoder`) or torchxrayvision's PSPNet layout.

    smp encoders are built with `encoder_weights=None`, so nothing is fetched from the internet:
    weights come only from `checkpoint_path` (or stay random when `allow_untrained`).
    """
    if cfg.checkpoint_format == "xrv_pspnet":
        return build_xrv_pspnet(len(cfg.classes))
    import segmentation_models_pytorch as smp

    try:
        net: nn.Module = smp.create_model(
            cfg.architecture,
            encoder_name=cfg.encoder,
            encoder_weights=None,
            in_channels=cfg.in_channels,
            classes=len(cfg.classes),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"cannot build smp {cfg.architecture} with encoder '{cfg.encoder}': {exc}", reason="MODEL_CONFIG_INVALID"
        ) from None
    return net


def build_xrv_pspnet(n_classes: int = 14) -> nn.Module:
    """The bare network inside `xrv.baseline_models.chestx_det.PSPNet`, with random weights.

    `PSPNet()` itself downloads its checkpoint in the constructor, so we build the inner
    `ptsemseg` network it wraps; the checkpoint file (`pspnet_chestxray_best_model_4.pth`, keys
    prefixed with `module.`) is then loaded by our own checkpoint loader.
    """
    try:
        from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet
    except ImportError:  # pragma: no cover - depends on the install
        raise CheckpointError(
            "checkpoint_format 'xrv_pspnet' needs torchxrayvision: pip install 'cxr-segmentation[xrv]'",
            reason="MODEL_CONFIG_INVALID",
        ) from None
    net: nn.Module = pspnet(n_classes)
    return net


def output_logits(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Forward pass returning N x C x H x W logits (unwraps dict/tuple outputs)."""
    out: torch.Tensor = net(batch)
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values())))
    if isinstance(out, tuple | list):
        out = out[-1]
    return out


class LogitsOf(nn.Module):
    """`output_logits` of a network as one module with one tensor out: what a model runtime exports."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.eval()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return output_logits(self.net, batch)
