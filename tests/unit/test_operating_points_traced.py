"""Operating-point normalisation survives a TorchScript trace: the traced graph answers like eager torch
on outputs whose below/above pattern differs from the trace example's. A mask-indexed version baked a
count of one into the graph (a scalar view) when the example and its check pair each had one output below
its point, and then failed on any image with more (a CI run's 500 on the gateway's NaN-threshold test)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cxr_classification.networks import ClassifierNetwork, op_norm
from cxr_serving.optimize.torchscript import is_traced, traced


class _Logits(nn.Module):
    """A "network" whose head outputs are the input itself, so the test chooses every probability."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_op_norm_maps_each_point_to_half_and_keeps_nan_raw():
    th = torch.tensor([0.2, 0.6, float("nan")])
    probs = torch.tensor([[0.2, 0.6, 0.9], [0.1, 0.8, 0.05]])
    out = op_norm(probs, th)
    assert torch.allclose(out[0, :2], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[1, 0], torch.tensor(0.1 / 0.4))  # below: p / (2 th)
    assert torch.allclose(out[1, 1], torch.tensor(1 - 0.2 / 0.8))  # above: 1 - (1-p) / (2 (1-th))
    assert torch.allclose(out[:, 2], probs[:, 2])  # no point: the raw probability


def test_a_traced_network_with_operating_points_answers_like_eager_on_any_pattern():
    th = torch.tensor([0.3, 0.3, float("nan"), 0.3])
    net = ClassifierNetwork(_Logits(), activation="sigmoid", output_index=[0, 1, 2, 3], op_threshs=th).eval()
    # one output under its point; traced() also checks the pair [example, example * 0.5], and halving a
    # logit of p=0.25 gives p=0.37, above 0.3: the pair too has exactly one output below
    one_below = torch.tensor([[_logit(0.25), _logit(0.8), _logit(0.7), _logit(0.6)]])
    graph, why = traced(net, one_below)
    assert is_traced(graph), why
    mixed = torch.tensor(
        [[_logit(0.1), _logit(0.8), _logit(0.2), _logit(0.05)], [_logit(0.9), _logit(0.2), _logit(0.5), _logit(0.4)]]
    )
    with torch.no_grad():
        assert torch.allclose(graph(mixed), net(mixed), atol=1e-6)
        assert torch.allclose(graph(mixed[:1]), net(mixed[:1]), atol=1e-6)


class _MaskIndexedOpNorm(nn.Module):
    """The old mask-indexed normalisation: its trace bakes in how many outputs were under their point."""

    def __init__(self, th: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("th", th)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(logits)
        th = self.th.expand_as(probs)
        below = probs < th
        out = probs.clone()
        out[below] = probs[below] / (th[below] * 2)
        return out


def test_traced_keeps_the_eager_module_when_the_graph_depends_on_the_example_values():
    """The load-time check also runs seeded random inputs, so a graph that passed on the example and its
    pair (both one output below its point) but breaks on other values is never served."""
    net = _MaskIndexedOpNorm(torch.tensor([0.3, 0.3, 0.3, 0.3])).eval()
    one_below = torch.tensor([[_logit(0.25), _logit(0.8), _logit(0.7), _logit(0.6)]])
    graph, why = traced(net, one_below)
    assert graph is net and not is_traced(graph)
    assert why.startswith(("trace failed", "traced output deviates")), why
