"""Masks at a network's observation points: the batched masked pass (every mask set in one forward, its head's
input and pooled outputs), and the paper's binary head over a classifier's rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .graph import Head, ObservationPoint
from .observe import hooks


def masked_features(net: nn.Module, points: Sequence[ObservationPoint], head: Head,
                    masks: dict[str, torch.Tensor], x: torch.Tensor, pooled: list | None = None) -> torch.Tensor:
    """Run ``net`` once per mask set, batched: masks (K, *shape) per point; returns head inputs (K, B, F).

    A list given as ``pooled`` receives every point's masked output, averaged over its spatial positions:
    (K, B, channels), in point order (what :mod:`cnnmod.calibrate`'s in-distribution test measures)."""
    k = next(iter(masks.values())).shape[0]
    b = x.shape[0]
    xk = x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
    def apply(p: ObservationPoint, out: torch.Tensor) -> torch.Tensor:
        m = masks[p.name]
        kept = out.reshape(k, b, *p.shape) * m.unsqueeze(1).to(out.dtype)
        if pooled is not None:
            pooled.append(kept.reshape(k, b, p.shape[0], -1).mean(-1))
        return kept.reshape(k * b, *p.shape)

    with head.capture(net) as captured, hooks(net, points, apply):
        net(xk)
    return captured["features"].reshape(k, b, -1)


def binary_head(weight: torch.Tensor, bias: torch.Tensor, concerned: int, scratch: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's binary head (docs/method.md, "Channeling"): rows [class c, mean of the other rows] and
    biases likewise; (2, F) and (2,). ``scratch`` (n - 1, F), when given, receives the other rows, so that a
    loop over 1,000 classes does not allocate (and fragment) a 1,000-row copy per class; the result is the
    same to the bit."""
    weight, bias = weight.detach(), bias.detach()
    others = torch.tensor([i for i in range(weight.shape[0]) if i != concerned], dtype=torch.long,
                          device=weight.device)
    rows = torch.index_select(weight, 0, others, out=scratch) if scratch is not None else weight[others]
    w = torch.stack([weight[concerned], rows.mean(0)])
    b = torch.stack([bias[concerned], bias[others].mean(0)])
    return w, b
