"""The networks: timm models (Swin by default) and torchvision's DenseNet-121.

`build_network` creates the bare architecture with the layout checkpoints use, so their
state dicts load unchanged: torchvision `densenet121` (the CheXNet and torchxrayvision
layouts; torchxrayvision's is the same with a 1-channel stem) or `timm.create_model`.
`ClassifierNetwork` wraps it as features -> head -> probabilities in label order, the split
Grad-CAM needs. No gRPC here.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from cxr_classification.config import ClassifierConfig


def build_network(cfg: ClassifierConfig) -> nn.Module:
    """The architecture of `cfg` with random weights and `cfg.head_size` outputs."""
    in_chans = cfg.in_chans or 3
    if cfg.model_type == "densenet121":
        net: nn.Module = torchvision.models.densenet121(weights=None, num_classes=cfg.head_size)
        if in_chans != 3:  # torchxrayvision: the same network with a 1-channel stem
            stem = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            net.get_submodule("features").conv0 = stem
        return net
    import timm

    assert cfg.timm_name is not None
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": cfg.head_size, "in_chans": in_chans}
    default = timm.get_pretrained_cfg(cfg.timm_name)
    default_size = default.input_size[-1] if default is not None and default.input_size else None
    if default_size != cfg.input_size:
        try:  # transformers fix their grid at build time; CNNs take any size and refuse the argument
            return timm.create_model(cfg.timm_name, img_size=cfg.input_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(cfg.timm_name, **kwargs)


def op_norm(probs: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's operating-point normalisation: each threshold maps to 0.5.

    An output without an operating point (NaN) keeps its raw probability: a constant 0.5 would
    read as positive at every threshold up to 0.5, whatever the image. Element-wise `where`, never
    a boolean-mask index: a traced graph would bake in how many outputs were under their point.
    """
    th = op_threshs.expand_as(probs)
    valid = ~torch.isnan(th)
    th = torch.where(valid, th, torch.full_like(th, 0.5))
    below = probs / (th * 2)
    above = 1.0 - (1.0 - probs) / ((1.0 - th) * 2)
    return torch.where(valid, torch.where(probs < th, below, above), probs)


class ClassifierNetwork(nn.Module):
    """A loaded network as the service uses it: `features`, `logits` and `forward` -> probabilities.

    `forward` returns one probability per configured label, in label order: it applies the
    activation (sigmoid, or softmax keeping the positive class), torchxrayvision operating
    points when the checkpoint carries them, and picks the configured labels out of a wider
    checkpoint head (e.g. 14 NIH findings out of xrv's 18 targets).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        activation: str,
        output_index: list[int],
        op_threshs: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.activation = activation
        self.output_index: torch.Tensor
        self.register_buffer("output_index", torch.tensor(output_index, dtype=torch.long), persistent=False)
        self.op_threshs: torch.Tensor | None
        self.register_buffer("op_threshs", op_threshs, persistent=False)
        self.is_torchvision_densenet = isinstance(net, torchvision.models.DenseNet)
        self.features_channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (what Grad-CAM explains)."""
        if self.is_torchvision_densenet:
            return self.net.features(x)  # type: ignore[no-any-return, operator]
        return self.net.forward_features(x)  # type: ignore[no-any-return, operator]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (logits) in the checkpoint's order."""
        if self.is_torchvision_densenet:
            out = nn.functional.relu(features)
            out = nn.functional.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
            return self.net.classifier(out)  # type: ignore[no-any-return, operator]
        return self.net.forward_head(features)  # type: ignore[no-any-return, operator]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "softmax":
            probs = torch.softmax(logits, dim=1)
        else:
            probs = torch.sigmoid(logits)
            if self.op_threshs is not None:
                probs = op_norm(probs, self.op_threshs)
        return probs.index_select(1, self.output_index)

    def has_operating_point(self) -> list[bool] | None:
        """Per configured label, whether the checkpoint has an operating point for it; None: no operating points."""
        if self.op_threshs is None or self.activation == "softmax":
            return None
        valid = ~torch.isnan(self.op_threshs.reshape(-1).index_select(0, self.output_index.to(self.op_threshs.device)))
        return [bool(v) for v in valid.tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self.head(self.features(x)))


class LogitsOf(nn.Module):
    """The part of a ClassifierNetwork a model runtime exports: image -> raw head outputs. The activation,
    operating points and label selection stay in torch (`ClassifierNetwork.probabilities`)."""

    def __init__(self, network: ClassifierNetwork) -> None:
        super().__init__()
        self.network = network
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.head(self.network.features(x))
