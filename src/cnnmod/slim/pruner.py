"""The iterative channel pruner behind slim modules and merged slim compositions (docs/method.md, "Slim
modules"): :class:`Pruner` holds a frozen copy of the source network with a gate per channel and closes gates
step by step for K binary margins (BatchNorm re-estimated and the head refitted after each step);
:data:`IMPORTANCE` ranks channels per rule (``taylor``, ``fisher``, learned ``gates`` or ``activation``);
:func:`take` chooses what one step closes;
:func:`prune_together` prunes several modules' pruners to one shared budget."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.calibrate import balanced_bce, fit_head
from ..core.channels import (
    classifier_input,
    closed_channels,
    cost_per_channel,
    fold_gates,
    frozen_copy,
    gated,
    narrowed,
    reestimate_bn,
    slice_network,
    sliced_cost,
    verify_sliced,
)
from ..core.observe import hooks
from ..errors import UserError
from ..models.classifier import Classifier
from .recovery import INPUTS, refit_layers

if TYPE_CHECKING:
    from .make import SlimSettings


SCALE_RANGE = (0.05, 4.0)  # learned channel scales (SlimSettings.scale_epochs) stay in this range


def step_rows(targets: torch.Tensor, n: int | None) -> torch.Tensor | None:
    """Indices of the ``n`` observed inputs the pruning steps work on (None: all of them), spread evenly: for one
    margin, half among its class's inputs and half among the others (observed in blocks of one class each, so
    evenly spread they stay balanced over the classes); for several, over all inputs alike. Every step works on
    the same ones."""
    if n is None or n >= targets.shape[0]:
        return None

    def spread(rows: torch.Tensor, want: int) -> torch.Tensor:
        want = min(want, rows.numel())
        return rows[torch.linspace(0, rows.numel() - 1, want).round().long()] if want > 0 else rows[:0]

    everything = torch.arange(targets.shape[0], device=targets.device)
    if targets.shape[1] > 1:
        return spread(everything, n)
    mine = targets[:, 0].bool()
    own = spread(everything[mine], n // 2)
    return torch.cat([own, spread(everything[~mine], n - own.numel())]).sort().values


def batchnorm_affine(net: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm layer's scale and shift (weight and bias) in ``net``: what ``scale_bn`` learns."""
    return [q for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
            for q in (m.weight, m.bias)]


def _head_rows(w: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head rows whose softmax is sigmoid(w . f + b): [w, 0] and [b, 0]."""
    return torch.stack([w, torch.zeros_like(w)]), torch.tensor([b, 0.0])


class Pruner:
    """Channel gates on a frozen copy of ``source``'s network, closed iteratively for K margins at once (docs/method.md,
    "Slim modules"): row k of the head is a binary margin, "class k" against the others of the observed world,
    fitted on observed inputs ``x_obs`` to ``targets`` (N, K) or, when ``soft`` is given, to the source's
    probabilities (N, K). A slim module has one row; a slim merged composition one per class. ``gates`` start
    all open, or as given (a merged composition starts from the union of its modules' channels).

    Once channels close, the network is narrowed (:meth:`narrow`): sliced to its open channels, so that every
    later pass costs what the smaller network costs; ``origin`` maps its channels back to the source's. Where
    the head is not a plain linear layer, or with :attr:`NARROWS` off, the closed channels stay gated in the full
    network instead; both compute the same."""

    NARROWS = True  # narrow the network as channels close (a test turns it off to compare with the gated one)
    ONE_PASS = True  # re-estimate BatchNorm and take the head's features in one pass where they can (refresh)

    def __init__(self, source: Classifier, s: SlimSettings, x_obs: torch.Tensor, targets: torch.Tensor,
                 soft: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor, batch_size: int = 256,
                 frozen: tuple | None = None, gates: list[torch.Tensor] | None = None,
                 bn_rows: int | None = None) -> None:
        self.source, self.s, self.batch_size = source, s, batch_size
        self.graph, self.net, self.groups = frozen or frozen_copy(source.net, source.spec.shape)
        device = next(self.net.parameters()).device
        self.gates = gates or [torch.ones(g["channels"], device=device) for g in self.groups.groups]
        self.source_groups = self.groups  # the source network's groups: what removed() numbers channels by
        self.origin = [torch.arange(g["channels"]) for g in self.groups.groups]  # per group: its channels' own
        self.narrows = self.NARROWS and self.graph.head.kind == "linear"
        self.x_obs, self.targets, self.soft = x_obs, targets, soft
        self.bn_rows = bn_rows  # BatchNorm statistics from the first bn_rows observed inputs (default: all)
        self.rows = step_rows(targets, s.step_samples)  # what each step works on (None: all observed)
        self.w, self.b = w.cpu(), b.cpu().double()
        self.total_params = sum(p.numel() for p in source.net.parameters())
        self.per_channel = self.rank_cost = None
        self._learned: list[torch.Tensor] | None = None  # rule "gates": learned once
        self._checked = False  # the first sliced network with channels cut is verified (then the last)
        if s.cost != "none":
            shape, classifier = source.spec.shape, self.graph.head
            self.per_channel = cost_per_channel(self.net, self.groups, shape, classifier, "params")
            self.rank_cost = self.per_channel
            if s.cost != "params":
                flops = cost_per_channel(self.net, self.groups, shape, classifier, "flops")
                total_flops = sliced_cost(self.net, shape, {}, classifier, "flops")
                self.rank_cost = [f / total_flops for f in flops] if s.cost == "flops" else [
                    p / self.total_params + f / total_flops for p, f in zip(self.per_channel, flops, strict=True)]

    def batches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i:i + self.batch_size] for i in range(0, x.shape[0], self.batch_size)]

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        net, classifier = self.net, self.graph.head
        with torch.no_grad(), gated(net, self.graph, self.groups, self.gates):
            return torch.cat([classifier_input(net, classifier, lambda xb=xb: net(xb)) for xb in self.batches(x)])

    def top1(self, x: torch.Tensor, labels: torch.Tensor, classes: list[int], z: torch.Tensor | None = None) -> float:
        """Top-1 among ``classes`` (row k of the head is class ``classes[k]``; one row alone: its binary accuracy,
        "mine or not") on inputs ``x`` with ``labels``, of the current network and head, or of the margins ``z``."""
        if z is None:
            z = self.features_of(x).cpu().double() @ self.w.double().T + self.b
        right = (z[:, 0] > 0) == (labels == classes[0]) if len(classes) == 1 else (
            torch.tensor(classes)[z.argmax(1)] == labels)
        return 100.0 * float(right.float().mean())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """The rows' class-balanced binary losses, summed."""
        return sum(balanced_bce(logits[:, k], targets[:, k], soft[:, k] if soft is not None else None)
                   for k in range(logits.shape[1]))

    def taylor(self) -> list[torch.Tensor]:
        """Per channel: |d loss / d gate| (summed over the step's batches), the first-order effect of closing it on
        the margins' loss."""
        return self.gate_gradients(lambda gr: gr.abs())

    def fisher(self) -> list[torch.Tensor]:
        """Per channel: N sum_n (d loss / d gate_n)^2 over the step's N inputs, each input's own gradient (a gate
        per input, :func:`~cnnmod.core.channels.gated`): the empirical Fisher information of the gate, the
        second-order effect of closing it (Molchanov et al. 2019, OBD's diagonal). A channel whose effects cancel
        over the inputs (helping some, hurting others) has a small Taylor score and a large Fisher one."""
        n = self.step_view()[0].shape[0]
        return self.gate_gradients(lambda gr: n * gr.pow(2).sum(0), per_input=True)

    def gate_gradients(self, score, per_input: bool = False) -> list[torch.Tensor]:
        """Per channel, ``score(gradient)`` summed over the step's batches: the gradient of the margins' loss with
        respect to every open gate, one (C,) per batch, or with ``per_input`` one (B, C) row per input."""
        scores = [torch.zeros(g["channels"]) for g in self.groups.groups]
        x, targets, soft = self.step_view()
        wd, bd = self.w.to(x.device), self.b.to(x.device, torch.float32)
        softs = self.batches(soft) if soft is not None else [None] * len(self.batches(targets))
        for xb, tb, sb in zip(self.batches(x), self.batches(targets), softs, strict=True):
            live = [(g.detach()[None].repeat(xb.shape[0], 1) if per_input else g.clone()).requires_grad_(True)
                    for g in self.gates]
            with gated(self.net, self.graph, self.groups, live):
                f = classifier_input(self.net, self.graph.head, lambda xb=xb: self.net(xb))
            logits = torch.stack([f @ wd[k] + bd[k] for k in range(wd.shape[0])], 1)
            grads = torch.autograd.grad(self.loss(logits, tb, sb), live, allow_unused=True)
            for i, gr in enumerate(grads):
                if gr is not None:
                    scores[i] += score(gr).cpu()
        return scores

    def learn_gates(self, epochs: int | None = None, penalise: bool = True, step: bool = True,
                    affine: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Gates learned for the margins' loss with the backbone frozen (GradSplitter's idea, per module): every
        open channel's gate is a multiplier in [0, 1], trained with Adam from 1 on the step's inputs, shuffled
        (BatchNorm on each batch's statistics), for ``gate_epochs`` epochs, the head rows with them, against the
        loss plus lambda times the parameters the open channels cost (each channel's own cost, times its gate).
        Lambda is the median importance per parameter of the first batch: a channel whose importance per
        parameter is under the median is pulled towards 0, the others held open by the loss; channels learn
        together, so one the margins can do without once others carry what it carried goes down too. Returns
        the gates (closed channels 0) and, per channel, the gradient summed over the iterations, per parameter
        the channel costs (negative: the loss held it open; it tells apart the gates that end at 1).

        Without ``penalise`` (:meth:`learn_scales`): no cost term, and the open channels' gates are scales in
        ``SCALE_RANGE``, learned from where they are for ``epochs``; without ``step``, over every observed input.
        With ``affine``, every BatchNorm layer's own scale and shift (its weight and bias) are learned with them
        (at the head's rate); the convolutions and linear layers stay frozen."""
        s, net = self.s, self.net
        epochs = s.gate_epochs if epochs is None else epochs
        low, high = (0.0, 1.0) if penalise else SCALE_RANGE
        x, targets, soft = self.step_view(step)
        open_ = [g > 0 for g in self.gates]
        theta = [g.detach().clone().float().requires_grad_(True) for g in self.gates]
        w = self.w.detach().clone().float().to(x.device).requires_grad_(True)
        b = self.b.detach().clone().float().to(x.device).requires_grad_(True)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn_affine = batchnorm_affine(net) if affine else []
        opt = torch.optim.Adam([{"params": theta, "lr": s.gate_lr},
                                {"params": [w, b, *bn_affine], "lr": s.gate_lr / 10}])
        share = ([c / self.total_params for c in self.per_channel] if self.per_channel is not None
                 else [1.0 / sum(g.numel() for g in self.gates)] * len(self.gates))
        generator = torch.Generator().manual_seed(s.seed)
        lam, pressure = (None if penalise else 0.0), [torch.zeros_like(t) for t in theta]
        for m in bns:
            m.train()
        for q in bn_affine:
            q.requires_grad_(True)
        try:
            for _ in range(epochs):
                for idx in torch.randperm(x.shape[0], generator=generator).split(self.batch_size):
                    if idx.numel() < 2:
                        continue
                    with gated(net, self.graph, self.groups, theta):
                        f = classifier_input(net, self.graph.head, lambda idx=idx: net(x[idx]))
                    loss = self.loss(f @ w.T + b, targets[idx], soft[idx] if soft is not None else None)
                    if lam is None:  # the scale of the loss's own gradients, per parameter
                        grads = torch.autograd.grad(loss, theta, retain_graph=True, allow_unused=True)
                        per_cost = torch.cat([(gr.abs() / c)[o] for gr, c, o in zip(grads, share, open_, strict=True)
                                              if gr is not None])
                        lam = float(per_cost.median()) if per_cost.numel() else 1.0
                    penalty = sum(c * t[o].sum() for c, t, o in zip(share, theta, open_, strict=True)) \
                        if penalise else 0.0
                    opt.zero_grad()
                    (loss + lam * penalty).backward()
                    for acc, t in zip(pressure, theta, strict=True):
                        acc += t.grad
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
        return [t.detach().cpu() for t in theta], [(acc / c).cpu() for acc, c in zip(pressure, share, strict=True)]

    def learn_scales(self, accuracy=None) -> None:
        """After the last step (``scale_epochs`` > 0): a scale per kept channel learned for the margins' loss
        with the backbone frozen (:meth:`learn_gates` without the cost term, over every observed input), then
        BatchNorm re-estimated and the head refitted. Slicing folds the scales into the layers that read the
        channels (:func:`fold_gates`), so a slim module costs no parameter more. With ``scale_bn``, the BatchNorm
        layers' own scales and shifts are learned with them (the module's network holds its own copy of them
        anyway). With ``accuracy`` (held-out), all of it is kept only if it does not fall."""
        if self.s.scale_epochs == 0:
            return
        before = accuracy() if accuracy is not None else None
        saved = [g.clone() for g in self.gates]
        saved_bn = [(q, q.detach().clone()) for q in batchnorm_affine(self.net)] if self.s.scale_bn else []
        learned, _ = self.learn_gates(self.s.scale_epochs, penalise=False, step=False, affine=self.s.scale_bn)
        for gate, t in zip(self.gates, learned, strict=True):
            open_ = gate > 0
            gate[open_] = t.to(gate.device)[open_]
        self.refresh()
        if before is not None and accuracy() < before:  # with held-out inputs: kept only if they do not lose
            for gate, old in zip(self.gates, saved, strict=True):
                gate.copy_(old)
            with torch.no_grad():
                for q, old in saved_bn:
                    q.copy_(old)
            self.refresh()

    def activation_rates(self) -> list[torch.Tensor]:
        """Per channel: the share of the rows' own inputs for which it is active somewhere."""
        x, targets, _ = self.step_view()
        mine = x[targets.any(1)]
        counts: dict[str, torch.Tensor] = {}

        def count(p, out):
            active = (out > 0).flatten(2).any(2) if out.dim() > 2 else out > 0
            counts[p.name] = counts.get(p.name, 0) + active.float().sum(0).cpu()

        with torch.no_grad(), hooks(self.net, self.graph.points, count), \
                gated(self.net, self.graph, self.groups, self.gates):
            for xb in self.batches(mine):
                self.net(xb)
        return [sum(counts[p] for p in g["points"]) / max(len(mine), 1) for g in self.groups.groups]

    def step_view(self, step: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The observed inputs, targets and soft targets a pruning step works on (``step``), or all of them."""
        if not step or self.rows is None:
            return self.x_obs, self.targets, self.soft
        return self.x_obs[self.rows], self.targets[self.rows], self.soft[self.rows] if self.soft is not None else None

    def narrow(self) -> None:
        """With channels closed: the network sliced to its open channels (the open channels' gates kept, the
        head's rows cut to the features that stay), checked on a few observed inputs against the gated one."""
        if not self.narrows or all(bool((g > 0).all()) for g in self.gates):
            return
        head = self.graph.head
        hw, hb = head.linear_map(self.net)
        net = slice_network(self.net, self.source.spec.shape, closed_channels(self.groups, self.gates), head, hw, hb)
        for q in net.parameters():
            q.requires_grad_(False)
        groups, masks = narrowed(self.groups, self.net, self.gates)
        gates = [g[g > 0].clone() for g in self.gates]
        self.verify(net, hw, hb, lambda: gated(net, self.graph, groups, gates))
        columns = masks["consumers"].get(head.layer)
        if columns is not None:
            self.w = self.w[:, columns]
        self.origin = [o[(g > 0).cpu()] for o, g in zip(self.origin, self.gates, strict=True)]
        self.net, self.groups, self.gates = net, groups, gates

    def snapshot(self) -> tuple:
        """What :meth:`restore` goes back to: the network as it is now, its channels, gates and head."""
        return self.net, self.groups, list(self.origin), [g.clone() for g in self.gates], self.w, self.b

    def restore(self, snapshot: tuple) -> None:
        """Back to a :meth:`snapshot` (a step undone: its network, narrowed or not, is the one before it)."""
        net, self.groups, origin, gates, self.w, self.b = snapshot
        self.net, self.origin, self.gates = net, list(origin), [g.clone() for g in gates]

    def kept_outputs(self) -> dict[str, torch.Tensor]:
        """Per layer of the source network that lost channels in the current network: the indices of its
        outputs that stay (what :func:`~cnnmod.slim.recovery.refit_layers` compares with the source's)."""
        return {layer: torch.nonzero(m).flatten() for layer, m in self._source_masks()["outputs"].items()}

    def head_columns(self) -> torch.Tensor:
        """The indices of the source network's head features that the current network computes, in its order."""
        mask = self._source_masks()["consumers"].get(self.graph.head.layer)
        return torch.arange(self.w.shape[1]) if mask is None else torch.nonzero(mask).flatten()

    def _source_masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """:func:`~cnnmod.core.channels.narrowed`'s masks for the source network narrowed to the current one's
        channels (closed channels it still has, gated, count as kept)."""
        kept = [torch.zeros(g["channels"]).index_fill_(0, o, 1.0)
                for g, o in zip(self.source_groups.groups, self.origin, strict=True)]
        return narrowed(self.source_groups, self.source.net, kept)[1]

    def refresh(self, step: bool = True) -> None:
        """The network narrowed to its open channels (:meth:`narrow`), BatchNorm statistics re-estimated (on the
        observed inputs among the first ``bn_rows``), then every row
        refitted: on a step's inputs (``step``), or on all observed ones. Where the two read the same inputs and
        they fit in one batch, one pass does both (:func:`~cnnmod.core.channels.reestimate_bn` with ``one_batch``:
        its features are the eval pass's). Otherwise the refit runs a plain pass of its own: features of a
        re-estimation over several batches (each normalised by its own statistics, and the observed inputs come in
        blocks of one class) fit heads that rank channels badly (BENCHMARKS.md, "Slim modules' cost")."""
        self.narrow()
        rows = self.rows if step else None
        limit = self.bn_rows or len(self.x_obs)
        bn = self.x_obs[:limit] if rows is None else self.x_obs[rows[rows < limit]]
        refit_rows = self.x_obs.shape[0] if rows is None else rows.numel()
        one = self.ONE_PASS and bn.shape[0] == refit_rows <= self.batch_size
        features: list[torch.Tensor] = []
        exact = reestimate_bn(self.net, lambda: features.append(self.features_of(bn)), one_batch=one)
        # the re-estimation's features serve only where they are the eval pass's (no BatchNorm: no pass ran)
        self.refit(step, features[0] if features and exact else None)

    def reconstruct(self, accuracy=None) -> None:
        """After the last step (``reconstruct``): the kept weights of every layer before the head refitted by least
        squares so that its outputs match the source model's (:func:`cnnmod.slim.recovery.refit_layers`,
        on :data:`~cnnmod.slim.recovery.INPUTS` of the step's inputs, spread evenly), then the head
        refitted (:meth:`refit`). When nothing is learned after it (``scale_epochs`` 0), BatchNorm keeps the model's
        statistics, as the refit computed every layer under them: re-estimated on the observed inputs instead, they
        normalise the refitted outputs unlike the model, and the ten modules of a quarter of the ResNet-20 lose 0.4
        points more. With scales to learn they are re-estimated first (:meth:`refresh`), as the scales were
        measured (kept, one seed of the best recipe lost 0.24 points more; BENCHMARKS.md, "Within 5 % of
        training, with the refit"). With ``accuracy`` (held-out), kept only if it does not fall."""
        self.narrow()
        before = accuracy() if accuracy is not None else None
        saved = {k: v.clone() for k, v in self.net.state_dict().items()} if before is not None else None
        x, _, _ = self.step_view()
        x = x[torch.linspace(0, x.shape[0] - 1, min(INPUTS, x.shape[0])).round().long().to(x.device)]
        refit_layers(self.net, self.source.net, lambda: gated(self.net, self.graph, self.groups, self.gates),
                     self.batches(x), self.graph.head.layer, self.s.seed, self.kept_outputs())
        if self.s.scale_epochs == 0:
            self.refit()
        else:
            self.refresh()
        if before is not None and accuracy() < before:
            self.net.load_state_dict(saved)  # the step's weights and BatchNorm statistics
            self.refit()

    def refit(self, step: bool = True, features: torch.Tensor | None = None) -> None:
        """Every head row refitted on the current network's features of a step's inputs, or of all observed
        (``features``: those, already computed)."""
        x, targets, soft = self.step_view(step)
        features = self.features_of(x) if features is None else features
        fitted = [fit_head(features, targets[:, k], self.w[k], float(self.b[k]),
                           soft=soft[:, k] if soft is not None else None) for k in range(self.w.shape[0])]
        self.w = torch.stack([w for w, _ in fitted])
        self.b = torch.tensor([b for _, b in fitted], dtype=torch.float64)  # as fitted: no rounding

    def kept_channels(self) -> int:
        return sum(int((g > 0).sum()) for g in self.gates)

    @property
    def channels(self) -> int:
        """The source network's channels in all groups."""
        return sum(g["channels"] for g in self.source_groups.groups)

    def removed(self) -> dict[str, list[int]]:
        """The closed channels of every group of the source network, by the group's first root layer."""
        out = {}
        for group, gate, origin in zip(self.source_groups.groups, self.gates, self.origin, strict=True):
            closed = torch.ones(group["channels"], dtype=torch.bool)
            closed[origin[gate.cpu() > 0]] = False
            out[group["roots"][0]] = [int(j) for j in torch.nonzero(closed).flatten()]
        return out

    def head(self, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over the source's features: a module's two rows [margin, 0], or a composition's K margins
        (slicing keeps the columns of the features that survive)."""
        return _head_rows(self.w[0], float(self.b[0])) if binary else (self.w, self.b.float())

    def sliced(self, binary: bool, check: bool = False) -> nn.Module:
        """The network cut to the open channels; with ``check``, verified on a few observed inputs against the
        gated network (torch-pruning slices what its dependency graph understands: an operation that depends
        on a channel count, such as a reshape to a fixed shape, breaks a sliced network silently)."""
        w, b = self.head(binary)
        net, head_w = self.net, w
        if any(bool(((g != 0) & (g != 1)).any()) for g in self.gates):  # learned scales: folded in
            net, columns = fold_gates(self.net, self.graph, self.groups, self.gates)
            head_w = w * columns.to(w.device, w.dtype)
        sliced = slice_network(net, self.source.spec.shape, closed_channels(self.groups, self.gates), self.graph.head,
                               head_w, b)
        if check:
            self.verify(sliced, w, b)
        return sliced

    def verify(self, net: nn.Module, w: torch.Tensor, b: torch.Tensor, running=nullcontext) -> None:
        """``net`` (cut from the current network) run on a few observed inputs, inside ``running()``, and checked
        against the current gated network with head rows ``w`` and ``b`` (:func:`verify_sliced`)."""
        x = self.x_obs[:8]
        with torch.no_grad():
            with gated(self.net, self.graph, self.groups, self.gates):
                f = classifier_input(self.net, self.graph.head, lambda: self.net(x))
            expected = f @ w.to(f.device, f.dtype).T + b.to(f.device, f.dtype)
            with running():
                verify_sliced(net, x, expected, type(self.source.net).__name__)

    def fraction(self, binary: bool) -> float:
        first_cut = not self._checked and any(bool((g == 0).any()) for g in self.gates)
        self._checked = self._checked or first_cut
        return sum(p.numel() for p in self.sliced(binary, check=first_cut).parameters()) / self.total_params

    def candidates(self) -> list[tuple[float, int, int]]:
        """The open channels that may close (every group keeps one), least important first, as (importance per
        cost, group, channel): with a ``cost``, per the parameters (or FLOPs) each costs; without, relative to
        its group's mean."""
        scores = getattr(self, IMPORTANCE[self.s.rule])()
        found = []
        for i, sc in enumerate(scores):
            kept = torch.nonzero(self.gates[i].cpu() > 0).flatten()
            if kept.numel() > 1:
                value = (sc[kept] / self.rank_cost[i] if self.rank_cost is not None
                         else sc[kept] / (sc[kept].mean() + 1e-12))
                found += [(float(value[j]), i, int(kept[j])) for j in range(kept.numel())]
        found.sort()
        return found

    def budget(self, fraction: float) -> float:
        """What one step cuts at ``fraction`` of the model's parameters: ``step`` of the kept parameters (never
        below ``size``, and at least a quarter step), or without a cost, ``step`` of the kept channels."""
        if self.per_channel is not None:
            return step_share(self.s, fraction) * self.total_params
        return max(1, int(self.s.step * self.kept_channels()))

    def channel_cost(self, group: int) -> float:
        return self.per_channel[group] if self.per_channel is not None else 1.0

    def close(self, chosen: list[tuple[int, int]], ranked: list[tuple[float, int, int]]) -> int:
        """Close the ``chosen`` (group, channel)s, then, with ``multiple``, the least important of ``ranked``
        that bring each group's count to a multiple of it (when above it); how many closed."""
        for i, j in chosen:
            self.gates[i][j] = 0.0
        closed = len(chosen)
        if self.s.multiple > 1:  # convolutions cost in blocks of channels
            least_first: dict[int, list[int]] = {}
            for _, i, j in ranked:
                least_first.setdefault(i, []).append(j)
            for i, gate in enumerate(self.gates):
                kept = int((gate > 0).sum())
                extra = kept % self.s.multiple if kept > self.s.multiple else 0
                for j in least_first.get(i, []):
                    if extra == 0:
                        break
                    if gate[j] > 0:
                        gate[j] = 0.0
                        extra -= 1
                        closed += 1
        return closed

    def record(self, binary: bool, history: list[dict]) -> float:
        """The sliced network's share of the model's parameters now, added to ``history`` with the kept
        channels."""
        fraction = self.fraction(binary)
        history.append({"params_fraction": round(fraction, 4), "kept_channels": self.kept_channels()})
        return fraction

    def close_least_important(self, fraction: float) -> int:
        """Close the least important channels until one step's :meth:`budget` is spent; how many closed."""
        if self.s.rule == "gates" and self._learned is None:
            return self.close_learned(fraction)
        ranked = self.candidates()
        chosen = take([(v, 0, i, j) for v, i, j in ranked], self.budget(fraction), [self])
        return self.close([(i, j) for _, i, j in chosen], ranked)

    def close_learned(self, fraction: float) -> int:
        """Rule ``gates``, the first step: learn the gates (:meth:`learn_gates`) and close the channels of lowest
        gate (they weigh cost already; ties: the one the loss held open least) straight down to ``size``, each
        channel's own cost counted (channels cut on both sides of a layer save less than the sum of their costs,
        so slicing finds the network larger than meant: later steps then rank as ``taylor`` does)."""
        self._learned, pressure = self.learn_gates()
        # lowest gate first; among equal gates (those at 1), the one the loss held open least
        order = sorted((float(t[j]), -float(pressure[i][j]), i, int(j)) for i, t in enumerate(self._learned)
                       for j in torch.nonzero(self.gates[i].cpu() > 0).flatten())
        ranked = [(v, i, j) for v, _, i, j in order]
        budget = max(fraction - self.s.size, 0.0) * self.total_params if self.per_channel is not None else \
            self.budget(fraction)
        chosen = take([(v, 0, i, j) for v, i, j in ranked], budget, [self])
        return self.close([(i, j) for _, i, j in chosen], ranked)

    def prune(self, binary: bool, accuracy=None, reference: float | None = None) -> list[dict]:
        """Close channels until the sliced network holds at most ``size`` of the model's parameters, or (with
        ``accuracy``, a function of the current state, and ``max_loss``) until the next step would put it more
        than ``max_loss`` points under ``reference`` (default: its accuracy before pruning); the history of the
        way down."""
        history = []
        start = (reference if reference is not None else accuracy()) if accuracy is not None else None
        while True:
            fraction = self.record(binary, history)
            if fraction <= self.s.size:
                break
            previous = self.snapshot()
            if self.close_least_important(fraction) == 0:  # every group is down to one channel
                if accuracy is None:
                    raise out_of_reach(self.s.size, self.source.arch, fraction, "the smallest it reaches is")
                break
            self.refresh()
            lost = start - accuracy() if start is not None else None
            if lost is not None and lost > self.s.max_loss:
                # not even the first step meets it: the slim module would be the whole model (a merged
                # composition keeps its union instead: what it was made from)
                if binary and len(history) == 1:
                    raise UserError(f"--max-loss {self.s.max_loss:g} pp cannot be met: the first pruning step "
                                    f"(to {self.fraction(binary):.4f} of the parameters) already loses {lost:.2f} pp "
                                    "of held-out accuracy; give a larger --max-loss, or keep the model whole")
                self.restore(previous)
                self.refresh()
                break
        if self.s.reconstruct:
            self.reconstruct(accuracy)
        self.learn_scales(accuracy)
        self.finish(accuracy, start - self.s.max_loss if start is not None else None)
        return history

    def finish(self, accuracy=None, floor: float | None = None) -> None:
        """The last head refit, on every observed input (pruning steps work on ``step_samples`` of them; the
        BatchNorm statistics stay the last step's: a few hundred inputs estimate a channel's mean and variance
        over all its positions well); kept unless it puts ``accuracy()`` under ``floor`` and under the step's."""
        if self.rows is None:
            return
        saved = self.w, self.b
        before = accuracy() if floor is not None else None
        self.refit(step=False)
        if floor is not None and (after := accuracy()) < floor and after < before:
            self.w, self.b = saved


# the Pruner method that ranks channels at each pruning step, per rule (``SlimSettings.rule``; rule "gates" learns
# its first cut, then ranks as taylor): a new importance is a method and one entry
IMPORTANCE = {"taylor": "taylor", "fisher": "fisher", "activation": "activation_rates", "gates": "taylor"}


def step_share(s: SlimSettings, fraction: float, size: float | None = None) -> float:
    """The share of the model's parameters one step cuts at ``fraction``: ``step`` of it, never below ``size``
    (default ``s.size``), and at least a quarter step."""
    size = s.size if size is None else size
    return max(min(s.step * fraction, fraction - size), s.step * fraction / 4)


def out_of_reach(size: float, arch: str, fraction: float, reached: str) -> UserError:
    """The one-line error for a ``--size`` no step can reach: every group is down to one channel at ``fraction``."""
    least = math.ceil(fraction * 1e4) / 1e4
    return UserError(f"--size {size:g} is out of reach for {arch}: every channel group keeps at least one channel, "
                     f"so {reached} {least:g} of the parameters; ask for --size {least:g} or more")


def take(ranked: list[tuple[float, int, int, int]], budget: float, pruners: list[Pruner],
         caps: list[float] | None = None) -> list[tuple[int, int, int]]:
    """The (pruner, group, channel)s of ``ranked`` ((importance per cost, pruner, group, channel), least important
    first) that one step closes: in order until ``budget`` parameters (or channels) are spent, every group keeping
    one channel, and with ``caps``, no pruner giving more than its cap."""
    quota = {(k, i): int((g > 0).sum()) - 1 for k, p in enumerate(pruners) for i, g in enumerate(p.gates)}
    given = [0.0] * len(pruners)
    chosen, spent = [], 0.0
    for _, k, i, j in ranked:
        if spent >= budget:
            break
        cost = pruners[k].channel_cost(i)
        if quota[k, i] > 0 and (caps is None or given[k] + cost <= caps[k]):
            chosen.append((k, i, j))
            quota[k, i] -= 1
            given[k] += cost
            spent += cost
    return chosen


def prune_together(pruners: list[Pruner], size: float) -> list[list[dict]]:
    """Prune slim modules' pruners (one margin each, the same source) together until their sliced networks hold
    ``size`` of the model's parameters on average: every step ranks the open channels of all of them on one scale
    (importance per cost: each module's loss is the same class-balanced binary loss, so a channel that an easy
    class's module can spare goes before one a hard class's needs) and closes the least important until ``step``
    of all the kept parameters are cut, no module giving more than twice ``step`` of its own. Each module's
    BatchNorm statistics and head are refreshed after each step it lost channels in; each keeps at least one
    channel per group. The history of each module's way down."""
    s = pruners[0].s
    histories: list[list[dict]] = [[] for _ in pruners]
    total = pruners[0].total_params
    if s.rule == "gates":  # each module's learned gates first (their own target: size), then ranked together
        for p, h in zip(pruners, histories, strict=True):
            if p.close_learned(p.record(True, h)):
                p.refresh()
    while True:
        fractions = [p.record(True, h) for p, h in zip(pruners, histories, strict=True)]
        mean = sum(fractions) / len(fractions)
        if mean <= size:
            break
        ranked = sorted((v, k, i, j) for k, p in enumerate(pruners) for v, i, j in p.candidates())
        budget = step_share(s, mean, size) * total * len(pruners)
        caps = [2 * s.step * f * total for f in fractions]
        chosen = take(ranked, budget, pruners, caps)
        if not chosen:
            raise out_of_reach(size, pruners[0].source.arch, mean, "its modules reach on average")
        for k, p in enumerate(pruners):
            mine = [(i, j) for kk, i, j in chosen if kk == k]
            if mine:
                p.close(mine, [(v, i, j) for v, kk, i, j in ranked if kk == k])
                p.refresh()
    for p in pruners:
        if s.reconstruct:
            p.reconstruct()
        p.learn_scales()
        p.finish()
    return histories
