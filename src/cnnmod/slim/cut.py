"""The network a pruner's gates leave, cut to its open channels (torch-pruning slices it), and its check against
the gated network it was cut from. A part of :class:`~cnnmod.slim.pruner.Pruner`: it reads the pruner's
``net``, ``graph``, ``groups``, ``gates``, head rows (``w``, ``b``, ``binary``), ``source``, ``x_obs`` and
``total_params``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from .channels import classifier_input, closed_channels, fold_gates, gated, slice_network, verify_sliced


class Cutting:
    """The sliced network, its share of the model's parameters, and its verification (the first network with
    channels cut, when :meth:`record` meets it, and the last, when a module or composition is made of it)."""

    checked = False  # whether a sliced network with channels cut has been verified (:meth:`record`)

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over the network's features: a module's two rows [margin, 0] (their softmax is the margin's
        sigmoid), or a composition's K margins."""
        if not self.binary:
            return self.w, self.b.float()
        w = self.w[0]
        return torch.stack([w, torch.zeros_like(w)]), torch.tensor([float(self.b[0]), 0.0])

    def sliced(self, check: bool = False) -> nn.Module:
        """The network cut to the open channels; with ``check``, verified on a few observed inputs against the
        gated network (torch-pruning slices what its dependency graph understands: an operation that depends
        on a channel count, such as a reshape to a fixed shape, breaks a sliced network silently)."""
        w, b = self.head()
        net, head_w = self.net, w
        if any(bool(((g != 0) & (g != 1)).any()) for g in self.gates):  # learned scales: folded in
            net, columns = fold_gates(self.net, self.graph, self.groups, self.gates)
            head_w = w * columns.to(w.device, w.dtype)
        sliced = slice_network(net, self.source.spec.shape, closed_channels(self.groups, self.gates), self.graph.head,
                               head_w, b, units=self.groups.units)
        if check:
            self.verify(sliced, w, b)
        return sliced

    def verify(self, net: nn.Module, w: torch.Tensor, b: torch.Tensor, running: Callable = nullcontext) -> None:
        """``net`` (cut from the current network) run on a few observed inputs, inside ``running()``, and checked
        against the current gated network with head rows ``w`` and ``b`` (:func:`verify_sliced`)."""
        x = self.x_obs[:8]
        with torch.no_grad():
            with gated(self.net, self.graph, self.groups, self.gates):
                f = classifier_input(self.net, self.graph.head, lambda: self.net(x))
            expected = f @ w.to(f.device, f.dtype).T + b.to(f.device, f.dtype)
            with running():
                verify_sliced(net, x, expected, type(self.source.net).__name__)

    def fraction(self) -> float:
        """The sliced network's share of the model's parameters."""
        return sum(p.numel() for p in self.sliced().parameters()) / self.total_params

    def record(self, history: list[dict]) -> float:
        """The sliced network's share of the model's parameters now, added to ``history`` with the kept channels.
        The first sliced network with channels cut is verified against the gated one (and the last one is, when
        the module or composition is made from it)."""
        cut = not self.checked and any(bool((g == 0).any()) for g in self.gates)
        fraction = sum(p.numel() for p in self.sliced(check=cut).parameters()) / self.total_params
        self.checked = self.checked or cut
        history.append({"params_fraction": round(fraction, 4), "kept_channels": self.kept_channels()})
        return fraction
