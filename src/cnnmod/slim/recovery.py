"""What a pruned network recovers after the last pruning step, with the backbone's weights never trained on a loss
(docs/method.md, "Slim modules"): the recipe's recoveries, in order,

1. :class:`Reconstruct` (``reconstruct``): every layer's kept weights refitted by least squares to give the model's
   own outputs back (:func:`~cnnmod.slim.refit.refit_layers`);
2. :class:`Scales` (``scale_epochs``, ``scale_bn``): a scale per kept channel learned for the margins' loss, folded
   into the weights when the network is sliced;
3. :class:`FinalRefit`: the head refitted on every observed input.

With ``accuracy`` (held-out), each is kept only if it does not lose."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .channels import classifier_input, gated
from .pruner import Pruner
from .refit import INPUTS, refit_layers

SCALE_RANGE = (0.05, 4.0)  # learned channel scales stay in this range
SCALE_LR = 0.05  # Adam's step on the channel scales (the head's and BatchNorm's: a tenth)

Accuracy = Callable[[], float] | None


def batchnorm_affine(net: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm layer's scale and shift (weight and bias) in ``net``: what ``scale_bn`` learns."""
    return [q for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
            for q in (m.weight, m.bias)]


class Recovery(ABC):
    """One named step of a recipe, run on a :class:`Pruner` after its last pruning step."""

    @abstractmethod
    def __call__(self, pruner: Pruner, accuracy: Accuracy = None) -> None: ...


@dataclass(frozen=True)
class Reconstruct(Recovery):
    """The kept weights of every layer before the head refitted by least squares so that its outputs match the
    source model's (on :data:`~cnnmod.slim.refit.INPUTS` of the step's inputs, spread evenly), then the head
    refitted. When no scales are learned after it, BatchNorm keeps the model's statistics, as the refit computed
    every layer under them; with scales to learn they are re-estimated first (:meth:`Pruner.refresh`)."""

    def __call__(self, pruner: Pruner, accuracy: Accuracy = None) -> None:
        p = pruner
        p.narrow()
        before = accuracy() if accuracy is not None else None
        saved = {k: v.clone() for k, v in p.net.state_dict().items()} if before is not None else None
        x, _, _ = p.step_view()
        x = x[torch.linspace(0, x.shape[0] - 1, min(INPUTS, x.shape[0])).round().long().to(x.device)]
        refit_layers(p.net, p.reference(), lambda: gated(p.net, p.graph, p.groups, p.gates), p.batches(x),
                     p.graph.head.layer, p.s.seed, p.kept_outputs())
        if p.s.scale_epochs == 0:
            p.refit()
        else:
            p.refresh()
        if before is not None and accuracy() < before:
            p.net.load_state_dict(saved)  # the step's weights and BatchNorm statistics
            p.refit()


@dataclass(frozen=True)
class Scales(Recovery):
    """A scale per kept channel learned for the margins' loss over every observed input for ``epochs`` epochs (Adam
    from the gates as they are, shuffled, BatchNorm on each batch's statistics, the head rows learned with them),
    the convolutions and linear layers frozen; with ``bn``, every BatchNorm layer's own scale and shift too (the
    module's network holds its own copy of them). Then BatchNorm re-estimated and the head refitted. Slicing folds
    the scales into the layers that read the channels, so a slim module costs no parameter more."""

    epochs: int
    bn: bool = False

    def __call__(self, pruner: Pruner, accuracy: Accuracy = None) -> None:
        p = pruner
        before = accuracy() if accuracy is not None else None
        saved = [g.clone() for g in p.gates]
        saved_bn = [(q, q.detach().clone()) for q in batchnorm_affine(p.net)] if self.bn else []
        for gate, t in zip(p.gates, self.learn(p), strict=True):
            open_ = gate > 0
            gate[open_] = t.to(gate.device)[open_]
        p.refresh()
        if before is not None and accuracy() < before:
            for gate, old in zip(p.gates, saved, strict=True):
                gate.copy_(old)
            with torch.no_grad():
                for q, old in saved_bn:
                    q.copy_(old)
            p.refresh()

    def learn(self, p: Pruner) -> list[torch.Tensor]:
        """The learned scales of every group (closed channels 0), on the CPU."""
        net, (low, high) = p.net, SCALE_RANGE
        x, targets, soft = p.step_view(step=False)
        open_ = [g > 0 for g in p.gates]
        theta = [g.detach().clone().float().requires_grad_(True) for g in p.gates]
        w = p.w.detach().clone().float().to(x.device).requires_grad_(True)
        b = p.b.detach().clone().float().to(x.device).requires_grad_(True)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn_affine = batchnorm_affine(net) if self.bn else []
        opt = torch.optim.Adam([{"params": theta, "lr": SCALE_LR}, {"params": [w, b, *bn_affine], "lr": SCALE_LR / 10}])
        generator = torch.Generator().manual_seed(p.s.seed)
        for m in bns:
            m.train()
        for q in bn_affine:
            q.requires_grad_(True)
        try:
            for _ in range(self.epochs):
                for idx in torch.randperm(x.shape[0], generator=generator).split(p.batch_size):
                    if idx.numel() < 2:
                        continue
                    with gated(net, p.graph, p.groups, theta):
                        f = classifier_input(net, p.graph.head, lambda idx=idx: net(x[idx]))
                    loss = p.loss(f @ w.T + b, targets[idx], soft[idx] if soft is not None else None)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for t, o in zip(theta, open_, strict=True):
                            t.clamp_(low, high)
                            t[~o] = 0.0
        finally:
            for m in bns:
                m.eval()
            for q in bn_affine:
                q.requires_grad_(False)
        return [t.detach().cpu() for t in theta]


@dataclass(frozen=True)
class FinalRefit(Recovery):
    """The last head refit, on every observed input (pruning steps work on ``step_samples`` of them; BatchNorm keeps
    the last step's statistics: a few hundred inputs estimate a channel's mean and variance over all its positions
    well); kept unless it puts ``accuracy()`` under ``floor`` and under what it was."""

    floor: float | None = None

    def __call__(self, pruner: Pruner, accuracy: Accuracy = None) -> None:
        p = pruner
        if p.rows is None:
            return
        saved = p.w, p.b
        floor = self.floor if accuracy is not None else None
        before = accuracy() if floor is not None else None
        p.refit(step=False)
        if floor is not None and (after := accuracy()) < floor and after < before:
            p.w, p.b = saved


def recoveries(pruner: Pruner, floor: float | None = None) -> list[Recovery]:
    """The recoveries ``pruner``'s settings ask for, in the order they run."""
    s = pruner.s
    steps: list[Recovery] = [Reconstruct()] if s.reconstruct else []
    if s.scale_epochs > 0:
        steps.append(Scales(s.scale_epochs, s.scale_bn))
    return [*steps, FinalRefit(floor)]


def recover(pruner: Pruner, accuracy: Accuracy = None, floor: float | None = None) -> None:
    """Run the recoveries of ``pruner``'s settings (``floor``: the final refit's, in points of ``accuracy``)."""
    for step in recoveries(pruner, floor):
        step(pruner, accuracy)
