"""The state of one channel-pruning run (docs/method.md, "Slim modules"): :class:`Pruner` holds a frozen copy of
the source network with a gate per channel, K head rows (binary margins) fitted on observed inputs, and the
operations every step and recovery uses: passes over the observed inputs, narrowing the network to its open
channels, refreshing BatchNorm and the head, undoing a step. Its other parts: the network cut to the open
channels and its check (:mod:`.cut`), and what it keeps in the source's numbering (:mod:`.mapping`). What to
close and when is the schedule's (:mod:`.schedule`); what is learned after the last step, the recoveries'
(:mod:`.recovery`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.attention import parse_heads
from ..core.calibrate import balanced_bce, fit_head
from ..models.classifier import Classifier
from .channels import (
    classifier_input,
    closed_channels,
    frozen_copy,
    gated,
    narrowed,
    reestimate_bn,
    slice_network,
)
from .config import SlimSettings
from .cut import Cutting
from .importance import CHANNEL_COSTS, StepView, importance, params_cost
from .mapping import ChannelMap


@dataclass
class Margins:
    """What a pruner fits its K head rows to: observed inputs ``x`` (prepared), ``targets`` (N, K) (row k: is the
    input of class k), the source's probabilities ``soft`` (N, K) to distil (None: the targets), the rows' start
    ``w`` (K, F) and ``b`` (K,), ``bn_rows``: BatchNorm statistics from the first ``bn_rows`` inputs only
    (None: all of them), and ``binary``: the rows are a slim module's one margin, whose sliced network ends in
    two rows [margin, 0] (their softmax is the margin's sigmoid); else a composition's K margins."""

    x: torch.Tensor
    targets: torch.Tensor
    soft: torch.Tensor | None
    w: torch.Tensor
    b: torch.Tensor
    bn_rows: int | None = None
    binary: bool = True


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


class Pruner(ChannelMap, Cutting):
    """Channel gates on a frozen copy of ``source``'s network, closed for K margins at once: row k of the head is a
    binary margin, "class k" against the others of the observed world (:class:`Margins`). A slim module has one
    row; a merged composition one per class. ``gates`` start all open, or as given (a merged composition starts
    from the union of its modules' channels); ``frozen``: :func:`~cnnmod.slim.channels.frozen_copy` of the source,
    when already made.

    Once channels close, the network is narrowed (:meth:`narrow`): sliced to its open channels, so that every later
    pass costs what the smaller network costs; ``origin`` maps its channels back to the source's. Where the head is
    not a plain linear layer, or without ``narrows``, the closed channels stay gated in the full network instead;
    both compute the same."""

    def __init__(self, source: Classifier, s: SlimSettings, margins: Margins, batch_size: int = 256,
                 frozen: tuple | None = None, gates: list[torch.Tensor] | None = None, narrows: bool = True) -> None:
        self.source, self.s, self.batch_size = source, s, batch_size
        self.graph, self.net, self.groups = frozen or frozen_copy(source.net, source.spec.shape,
                                                                           parse_heads(s.heads))
        device = next(self.net.parameters()).device
        self.gates = gates or [torch.ones(g.channels, device=device) for g in self.groups.groups]
        self.source_groups = self.groups  # the source network's groups: what removed() numbers channels by
        self.origin = [torch.arange(g.channels) for g in self.groups.groups]  # per group: its channels' own
        self.narrows = narrows and self.graph.head.kind == "linear"
        self.x_obs, self.targets, self.soft, self.bn_rows = margins.x, margins.targets, margins.soft, margins.bn_rows
        self.binary = margins.binary
        self.rows = step_rows(self.targets, s.step_samples)  # what each step works on (None: all observed)
        self.w, self.b = margins.w.cpu(), margins.b.cpu().double()
        self.total_params = sum(p.numel() for p in source.net.parameters())
        self.importance = importance(s.rule)  # ranks the open channels at every step (:mod:`.schedule`)
        # per group, the parameters one channel costs (what a step's budget counts), and what its importance is
        # divided by when channels are ranked
        self.per_channel = params_cost(self.net, self.graph, self.groups, source.spec.shape)
        self.rank_cost = CHANNEL_COSTS[s.cost](self.net, self.graph, self.groups, source.spec.shape)

    # ---------------------------------------------------------------- passes
    def batches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i:i + self.batch_size] for i in range(0, x.shape[0], self.batch_size)]

    def step_view(self, step: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The observed inputs, targets and soft targets a pruning step works on (``step``), or all of them."""
        if not step or self.rows is None:
            return self.x_obs, self.targets, self.soft
        return self.x_obs[self.rows], self.targets[self.rows], self.soft[self.rows] if self.soft is not None else None

    def view(self) -> StepView:
        """What an importance reads at this step (:class:`~cnnmod.slim.importance.StepView`)."""
        x, targets, soft = self.step_view()
        return StepView(self.net, self.graph, self.groups, self.gates, x, targets, soft, self.w, self.b, self.loss,
                        self.batch_size)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        net, head = self.net, self.graph.head
        with torch.no_grad(), gated(net, self.graph, self.groups, self.gates):
            return torch.cat([classifier_input(net, head, lambda xb=xb: net(xb)) for xb in self.batches(x)])

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

    # ---------------------------------------------------------------- after channels close
    def narrow(self) -> None:
        """With channels closed: the network sliced to its open channels (the open channels' gates kept, the
        head's rows cut to the features that stay), checked on a few observed inputs against the gated one."""
        if not self.narrows or all(bool((g > 0).all()) for g in self.gates):
            return
        head = self.graph.head
        hw, hb = head.linear_map(self.net)
        net = slice_network(self.net, self.source.spec.shape, closed_channels(self.groups, self.gates), head, hw, hb,
                            units=self.groups.units)
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

    def refresh(self, step: bool = True) -> None:
        """The network narrowed to its open channels (:meth:`narrow`), BatchNorm statistics re-estimated (on the
        observed inputs among the first ``bn_rows``), then every row refitted: on a step's inputs (``step``), or
        on all observed ones. Where the two read the same inputs and they fit in one batch, one pass does both
        (:func:`~cnnmod.slim.channels.reestimate_bn` with ``one_batch``: its features are the eval pass's).
        Otherwise the refit runs a plain pass of its own: the features of a re-estimation over several batches
        are each normalised by their own batch's statistics, and the observed inputs come in blocks of one class."""
        self.narrow()
        rows = self.rows if step else None
        limit = self.bn_rows or len(self.x_obs)
        bn = self.x_obs[:limit] if rows is None else self.x_obs[rows[rows < limit]]
        refit_rows = self.x_obs.shape[0] if rows is None else rows.numel()
        one = bn.shape[0] == refit_rows <= self.batch_size
        features: list[torch.Tensor] = []
        exact = reestimate_bn(self.net, lambda: features.append(self.features_of(bn)), one_batch=one)
        # the re-estimation's features serve only where they are the eval pass's (no BatchNorm: no pass ran)
        self.refit(step, features[0] if features and exact else None)

    def refit(self, step: bool = True, features: torch.Tensor | None = None) -> None:
        """Every head row refitted on the current network's features of a step's inputs, or of all observed
        (``features``: those, already computed)."""
        x, targets, soft = self.step_view(step)
        features = self.features_of(x) if features is None else features
        fitted = [fit_head(features, targets[:, k], self.w[k], float(self.b[k]),
                           soft=soft[:, k] if soft is not None else None) for k in range(self.w.shape[0])]
        self.w = torch.stack([w for w, _ in fitted])
        self.b = torch.tensor([b for _, b in fitted], dtype=torch.float64)  # as fitted: no rounding

    def snapshot(self) -> tuple:
        """What :meth:`restore` goes back to: the network as it is now, its channels, gates and head."""
        return self.net, self.groups, list(self.origin), [g.clone() for g in self.gates], self.w, self.b

    def restore(self, snapshot: tuple) -> None:
        """Back to a :meth:`snapshot` (a step undone: its network, narrowed or not, is the one before it)."""
        net, self.groups, origin, gates, self.w, self.b = snapshot
        self.net, self.origin, self.gates = net, list(origin), [g.clone() for g in gates]
