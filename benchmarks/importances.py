"""Channel importances and costs that benchmarks compare against the library's, registered by name once this module
is imported: ``SlimSettings(rule="activation")`` (how often a channel is active for the margins' own inputs, the
post-hoc baseline; measured dominated for slim modules, BENCHMARKS.md, "Slim modules' cost") and
``SlimSettings(cost="both")`` (a channel's share of the parameters plus its share of the FLOPs, which the merged
pairs of "Two classes, seven pairs" were measured with). They are a benchmark's settings, not the library's."""

from __future__ import annotations

import torch

from cnnmod.core.observe import hooks
from cnnmod.slim.channels import gated
from cnnmod.slim.importance import (
    Importance,
    StepView,
    flops_cost,
    params_cost,
    register_channel_cost,
    register_importance,
)


@register_importance
class ActivationRate(Importance):
    """Per channel: the share of the margins' own inputs for which it is active somewhere (the post-hoc baseline of
    MODA and MwT)."""

    name = "activation"

    def __call__(self, view: StepView) -> list[torch.Tensor]:
        mine = view.x[view.targets.any(1)]
        counts: dict[str, torch.Tensor] = {}

        def count(p, out):
            active = (out > 0).flatten(2).any(2) if out.dim() > 2 else out > 0
            counts[p.name] = counts.get(p.name, 0) + active.float().sum(0).cpu()

        with torch.no_grad(), hooks(view.net, view.graph.points, count), \
                gated(view.net, view.graph, view.groups, view.gates):
            for xb in view.batches(mine):
                view.net(xb)
        return [sum(counts[p] for p in g.points) / max(len(mine), 1) for g in view.groups.groups]


def params_and_flops(net, graph, groups, input_shape) -> list[torch.Tensor]:
    """Per group, one channel's share of the model's parameters plus its share of the model's FLOPs."""
    total_params = sum(p.numel() for p in net.parameters())
    return [p / total_params + f for p, f in zip(params_cost(net, graph, groups, input_shape),
                                                  flops_cost(net, graph, groups, input_shape), strict=True)]


register_channel_cost("both", params_and_flops)
