"""Channel importances and costs that benchmarks compare against the library's, registered by name once this module
is imported: ``SlimSettings(rule="activation")`` (how often a channel is active for the margins' own inputs, the
post-hoc baseline; measured dominated for slim modules, BENCHMARKS.md, "Slim modules' cost") and
``SlimSettings(cost="both")`` (a channel's share of the parameters plus its share of the FLOPs, which the merged
pairs of "Two classes, seven pairs" were measured with). They are a benchmark's settings, not the library's."""

from __future__ import annotations

import torch

from cnnmod.core.channels import cost_per_channel, gated, sliced_cost
from cnnmod.core.observe import hooks
from cnnmod.slim.importance import Importance, register_channel_cost, register_importance


@register_importance
class ActivationRate(Importance):
    """Per channel: the share of the margins' own inputs for which it is active somewhere (the post-hoc baseline of
    MODA and MwT)."""

    name = "activation"

    def __call__(self, pruner) -> list[torch.Tensor]:
        x, targets, _ = pruner.step_view()
        mine = x[targets.any(1)]
        counts: dict[str, torch.Tensor] = {}

        def count(p, out):
            active = (out > 0).flatten(2).any(2) if out.dim() > 2 else out > 0
            counts[p.name] = counts.get(p.name, 0) + active.float().sum(0).cpu()

        with torch.no_grad(), hooks(pruner.net, pruner.graph.points, count), \
                gated(pruner.net, pruner.graph, pruner.groups, pruner.gates):
            for xb in pruner.batches(mine):
                pruner.net(xb)
        return [sum(counts[p] for p in g["points"]) / max(len(mine), 1) for g in pruner.groups.groups]


def params_and_flops(pruner) -> list[torch.Tensor]:
    """Per group, one channel's share of the model's parameters plus its share of the model's FLOPs."""
    shape, head = pruner.source.spec.shape, pruner.graph.head
    total_flops = sliced_cost(pruner.net, shape, {}, head, "flops")
    flops = cost_per_channel(pruner.net, pruner.groups, shape, head, "flops")
    return [p / pruner.total_params + f / total_flops for p, f in zip(pruner.per_channel, flops, strict=True)]


register_channel_cost("both", params_and_flops)
