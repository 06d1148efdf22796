"""Channel importances that benchmarks compare against the library's (Taylor, Fisher), registered by name so that
``SlimSettings(rule="activation")`` ranks with them once this module is imported. Measured dominated for slim
modules (BENCHMARKS.md, "Slim modules' cost"), they are baselines, not library settings."""

from __future__ import annotations

import torch

from cnnmod.core.channels import gated
from cnnmod.core.observe import hooks
from cnnmod.slim.importance import Importance, register_importance


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
