"""Channel importance for slim pruning (docs/method.md, "Slim modules"): an :class:`Importance` scores every open
channel, from what a pruning step shows it (:class:`StepView`), by what closing it would cost the margins it
prunes for, and a channel cost (:data:`CHANNEL_COSTS`) says what the importance is divided by when channels are
ranked.

A new importance is a subclass registered by name (:func:`register_importance`); ``SlimSettings.rule`` names it.
A new channel cost is a function registered by name (:func:`register_channel_cost`); ``SlimSettings.cost`` names
it. The library registers Taylor's and Fisher's importance and the parameter and FLOP costs; benchmarks register
their baselines the same way."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.graph import ModelGraph
from .channels import ChannelGroups, classifier_input, cost_per_channel, gated, sliced_cost


@dataclass(frozen=True)
class StepView:
    """What an importance reads at a pruning step: the network (``net``, its ``graph``, its channel ``groups``)
    with a gate per group (``gates``: 1 open, 0 closed), the step's inputs ``x`` with their ``targets`` (N, K)
    and the source's probabilities ``soft`` (None: the targets), the K head rows (``w``, ``b``) over the
    network's features, and the margins' ``loss(logits, targets, soft)``; passes run ``batch_size`` inputs at a
    time (:meth:`batches`)."""

    net: nn.Module
    graph: ModelGraph
    groups: ChannelGroups
    gates: list[torch.Tensor]
    x: torch.Tensor
    targets: torch.Tensor
    soft: torch.Tensor | None
    w: torch.Tensor
    b: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    batch_size: int

    def batches(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t[i:i + self.batch_size] for i in range(0, t.shape[0], self.batch_size)]


class Importance(ABC):
    """Called with a :class:`StepView`: per group, a score per channel (C,) on the CPU; the larger, the more the
    margins lose when it closes. Closed channels' scores are never read."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, view: StepView) -> list[torch.Tensor]: ...


IMPORTANCES: dict[str, type[Importance]] = {}


def register_importance(cls: type[Importance]) -> type[Importance]:
    """Make an :class:`Importance` available by its ``name`` (``SlimSettings(rule=name)``)."""
    IMPORTANCES[cls.name] = cls
    return cls


def importance(name: str) -> Importance:
    return IMPORTANCES[name]()


def params_cost(net: nn.Module, graph: ModelGraph, groups: ChannelGroups,
                input_shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """Per group, the parameters one of its channels costs."""
    return cost_per_channel(net, groups, input_shape, graph.head, "params")


def flops_cost(net: nn.Module, graph: ModelGraph, groups: ChannelGroups,
               input_shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """Per group, the share of the model's FLOPs (per image) one of its channels costs."""
    total = sliced_cost(net, input_shape, {}, graph.head, "flops")
    return [f / total for f in cost_per_channel(net, groups, input_shape, graph.head, "flops")]


CHANNEL_COSTS: dict[str, Callable] = {"params": params_cost, "flops": flops_cost}


def register_channel_cost(name: str, cost: Callable) -> Callable:
    """Make ``cost(net, graph, groups, input_shape)`` (per group, what one of its channels costs) available by
    ``name`` (``SlimSettings(cost=name)``)."""
    CHANNEL_COSTS[name] = cost
    return cost


def gate_gradients(view: StepView, score: Callable[[torch.Tensor], torch.Tensor],
                   per_input: bool = False) -> list[torch.Tensor]:
    """Per channel, ``score(gradient)`` summed over the step's batches: the gradient of the margins' loss with
    respect to every open gate, one (C,) per batch, or with ``per_input`` one (B, C) row per input (a gate per
    input, :func:`~cnnmod.slim.channels.gated`)."""
    v = view
    scores = [torch.zeros(g.channels) for g in v.groups.groups]
    wd, bd = v.w.to(v.x.device), v.b.to(v.x.device, torch.float32)
    softs = v.batches(v.soft) if v.soft is not None else [None] * len(v.batches(v.targets))
    for xb, tb, sb in zip(v.batches(v.x), v.batches(v.targets), softs, strict=True):
        live = [(g.detach()[None].repeat(xb.shape[0], 1) if per_input else g.clone()).requires_grad_(True)
                for g in v.gates]
        with gated(v.net, v.graph, v.groups, live):
            f = classifier_input(v.net, v.graph.head, lambda xb=xb: v.net(xb))
        logits = torch.stack([f @ wd[k] + bd[k] for k in range(wd.shape[0])], 1)
        grads = torch.autograd.grad(v.loss(logits, tb, sb), live, allow_unused=True)
        for i, gr in enumerate(grads):
            if gr is not None:
                scores[i] += score(gr).cpu()
    return scores


@register_importance
class Taylor(Importance):
    """|d loss / d gate| summed over the step's batches: the first-order effect of closing a channel on the
    margins' loss."""

    name = "taylor"

    def __call__(self, view: StepView) -> list[torch.Tensor]:
        return gate_gradients(view, lambda gr: gr.abs())


@register_importance
class Fisher(Importance):
    """N sum_n (d loss / d gate_n)^2 over the step's N inputs, each input's own gradient: the gate's empirical
    Fisher information, the second-order effect of closing it (Molchanov et al. 2019, OBD's diagonal). A channel
    whose effects cancel over the inputs (helping some, hurting others) has a small Taylor score and a large
    Fisher one."""

    name = "fisher"

    def __call__(self, view: StepView) -> list[torch.Tensor]:
        n = view.x.shape[0]
        return gate_gradients(view, lambda gr: n * gr.pow(2).sum(0), per_input=True)
