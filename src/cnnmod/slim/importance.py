"""Channel importance for slim pruning (docs/method.md, "Slim modules"): an :class:`Importance` scores every open
channel of a :class:`~cnnmod.slim.pruner.Pruner` by what closing it would cost the margins it prunes for, and a
channel cost (:data:`CHANNEL_COSTS`) says what the importance is divided by when channels are ranked.

A new importance is a subclass registered by name (:func:`register_importance`); ``SlimSettings.rule`` names it.
A new channel cost is a function registered by name (:func:`register_channel_cost`); ``SlimSettings.cost`` names
it. The library registers Taylor's and Fisher's importance and the parameter and FLOP costs; benchmarks register
their baselines the same way."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ..core.channels import classifier_input, cost_per_channel, gated, sliced_cost


class Importance(ABC):
    """Called with a :class:`~cnnmod.slim.pruner.Pruner` (this module never imports it: the pruner builds its
    importance by name): per group of the pruner's network, a score per channel (C,) on the CPU; the larger, the
    more the margins lose when it closes. Closed channels' scores are never read."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, pruner) -> list[torch.Tensor]: ...


IMPORTANCES: dict[str, type[Importance]] = {}


def register_importance(cls: type[Importance]) -> type[Importance]:
    """Make an :class:`Importance` available by its ``name`` (``SlimSettings(rule=name)``)."""
    IMPORTANCES[cls.name] = cls
    return cls


def importance(name: str) -> Importance:
    return IMPORTANCES[name]()


def params_cost(pruner) -> list[torch.Tensor]:
    """Per group, the parameters one of its channels costs."""
    return pruner.per_channel


def flops_cost(pruner) -> list[torch.Tensor]:
    """Per group, the share of the model's FLOPs (per image) one of its channels costs."""
    shape, head = pruner.source.spec.shape, pruner.graph.head
    total = sliced_cost(pruner.net, shape, {}, head, "flops")
    return [f / total for f in cost_per_channel(pruner.net, pruner.groups, shape, head, "flops")]


CHANNEL_COSTS: dict[str, Callable] = {"params": params_cost, "flops": flops_cost}


def register_channel_cost(name: str, cost: Callable) -> Callable:
    """Make ``cost(pruner)`` (per group, what one of its channels costs) available by ``name``
    (``SlimSettings(cost=name)``)."""
    CHANNEL_COSTS[name] = cost
    return cost


def gate_gradients(pruner, score: Callable[[torch.Tensor], torch.Tensor],
                   per_input: bool = False) -> list[torch.Tensor]:
    """Per channel, ``score(gradient)`` summed over the step's batches: the gradient of the margins' loss with
    respect to every open gate of ``pruner``, one (C,) per batch, or with ``per_input`` one (B, C) row per input
    (a gate per input, :func:`~cnnmod.core.channels.gated`)."""
    p = pruner
    scores = [torch.zeros(g["channels"]) for g in p.groups.groups]
    x, targets, soft = p.step_view()
    wd, bd = p.w.to(x.device), p.b.to(x.device, torch.float32)
    softs = p.batches(soft) if soft is not None else [None] * len(p.batches(targets))
    for xb, tb, sb in zip(p.batches(x), p.batches(targets), softs, strict=True):
        live = [(g.detach()[None].repeat(xb.shape[0], 1) if per_input else g.clone()).requires_grad_(True)
                for g in p.gates]
        with gated(p.net, p.graph, p.groups, live):
            f = classifier_input(p.net, p.graph.head, lambda xb=xb: p.net(xb))
        logits = torch.stack([f @ wd[k] + bd[k] for k in range(wd.shape[0])], 1)
        grads = torch.autograd.grad(p.loss(logits, tb, sb), live, allow_unused=True)
        for i, gr in enumerate(grads):
            if gr is not None:
                scores[i] += score(gr).cpu()
    return scores


@register_importance
class Taylor(Importance):
    """|d loss / d gate| summed over the step's batches: the first-order effect of closing a channel on the
    margins' loss."""

    name = "taylor"

    def __call__(self, pruner) -> list[torch.Tensor]:
        return gate_gradients(pruner, lambda gr: gr.abs())


@register_importance
class Fisher(Importance):
    """N sum_n (d loss / d gate_n)^2 over the step's N inputs, each input's own gradient: the gate's empirical
    Fisher information, the second-order effect of closing it (Molchanov et al. 2019, OBD's diagonal). A channel
    whose effects cancel over the inputs (helping some, hurting others) has a small Taylor score and a large
    Fisher one."""

    name = "fisher"

    def __call__(self, pruner) -> list[torch.Tensor]:
        n = pruner.step_view()[0].shape[0]
        return gate_gradients(pruner, lambda gr: n * gr.pow(2).sum(0), per_input=True)
