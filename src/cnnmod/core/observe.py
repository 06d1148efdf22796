"""Activation statistics at the observation points: the one pass every decomposition is computed from.

docs/method.md, "Concern and tangling identification": module c keeps node j iff ``count_all[c][j] > 0`` or
``count_first_k[c'][j] > 0`` for
some c' != c. Instead of one count per k, the pass records for every class and node the position (in the
class's observation order) of the first input that made the node active; "active among the first k" is then
``first[c'][j] < k`` for any k, so modules with different budgets come from the same pass.

The pass is batched, runs on CPU or CUDA, and is torchrun-aware: each rank observes a shard of every class's
inputs (positions stay global), and the statistics are combined with all-reduce (sum and min).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.dataset import ImageSet
from ..errors import UserError
from ..progress import progress_bar
from ..runtime import Distributed
from .bits import pack_bits, unpack_bits
from .graph import ModelGraph, ObservationPoint


@dataclass
class ActivationStats:
    """What concern and tangling identification need of the observed inputs, as bits (docs/method.md, "One
    observation pass"): per class and node, whether some observed input of the class made it active
    (``active``), and for every tangling budget k in use, whether one of the class's first k inputs did
    (``early[k]``), with per node the number of classes for which that holds (``early_classes[k]``: "active
    among the first k of some other class" is that count minus the class's own bit). Bits are packed eight
    nodes a byte, so memory is 2 bits per class and node, not the 8 bytes of two counters. Activation counts,
    which only the ``tau`` switch needs, are kept only when asked for (int16 where at most 32,767 inputs of a
    class are observed)."""

    points: list[ObservationPoint]
    observed: torch.Tensor                           # int64 (n_classes,): inputs observed per class
    active: dict[str, torch.Tensor]                  # point -> uint8 (n_classes, ceil(size / 8))
    early: dict[int, dict[str, torch.Tensor]]        # k -> point -> uint8 (n_classes, ceil(size / 8))
    early_classes: dict[int, dict[str, torch.Tensor]]  # k -> point -> int32 (*shape)
    counts: dict[str, torch.Tensor] | None = None    # point -> (n_classes, *shape) when recorded
    settings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.observed.numel())

    @property
    def num_nodes(self) -> int:
        return sum(p.size for p in self.points)

    def mine(self, point: ObservationPoint, c: int) -> torch.Tensor:
        """Bool (*shape): nodes active for some observed input of class c."""
        return unpack_bits(self.active[point.name][c], point.size).reshape(point.shape)

    def any_class(self, point: ObservationPoint) -> torch.Tensor:
        """Bool (*shape): nodes active for some observed input of any class."""
        packed = self.active[point.name]
        folded = packed[0].clone()
        for row in packed[1:]:
            folded |= row
        return unpack_bits(folded, point.size).reshape(point.shape)

    def others_early(self, point: ObservationPoint, c: int, k: int) -> torch.Tensor:
        """Bool (*shape): nodes active among the first k observed inputs of some class other than c."""
        if k not in self.early:
            raise ValueError(f"the observation pass recorded no tangling budget {k} (has {sorted(self.early)})")
        own = unpack_bits(self.early[k][point.name][c], point.size).reshape(point.shape)
        return (self.early_classes[k][point.name] - own.to(torch.int32)) > 0

    def count(self, point: ObservationPoint, c: int) -> torch.Tensor:
        if self.counts is None:
            raise UserError("this observation pass recorded no activation counts, which --tau needs; observe "
                            "again with counts=True")
        return self.counts[point.name][c]


def tangling_budget(observed: int, classes: int) -> int:
    """k of tangling identification: how many of each other class's first inputs a module keeps the nodes of,
    max(1, floor(observed / (classes - 1))) for ``observed`` inputs of its own class among ``classes``."""
    return max(1, observed // max(classes - 1, 1))


def class_order(labels: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """Per class, the indices of its inputs in data-set order after one seeded shuffle of the whole set."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    shuffled = labels[perm]
    return [perm[shuffled == c] for c in range(num_classes)]


@contextmanager
def hooks(net: nn.Module, points: list[ObservationPoint], fn) -> Iterator[None]:
    """Call ``fn(point, output)`` on every observation point's output; ``fn`` may return a replacement."""
    handles = []
    try:
        for p in points:
            handles.append(net.get_submodule(p.name).register_forward_hook(
                lambda _m, _i, out, p=p: fn(p, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _predict_correct(net: nn.Module, prepare, images: torch.Tensor, label: int, device: torch.device,
                     batch_size: int) -> torch.Tensor:
    ok = []
    for start in range(0, images.shape[0], batch_size):
        x = prepare(images[start:start + batch_size].to(device))
        ok.append((net(x).argmax(1) == label).cpu())
    return torch.cat(ok) if ok else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def observe(net: nn.Module, graph: ModelGraph, prepare, data: ImageSet, *, samples: int = 1000, seed: int = 0,
            correct_only: bool = False, device: torch.device | None = None, batch_size: int = 256,
            dd: Distributed | None = None, show_progress: bool = True, counts: bool = False) -> ActivationStats:
    """Observe up to ``samples`` training inputs of every class of ``data`` (labels = the model's outputs),
    one class after another; ``counts`` also keeps activation counts (for ``tau``)."""
    dd = dd or Distributed()
    device = device or next(net.parameters()).device
    n = data.num_classes
    if samples < 1:
        raise UserError(f"--ci-samples must be at least 1, got {samples}")
    order = class_order(data.labels, n, seed)
    for c, idx in enumerate(order):
        if idx.numel() == 0:
            raise UserError(f"class {c} ({data.class_names[c]}) has no training images; decomposition needs "
                            "inputs of every class")
    was_training = net.training
    net.eval()
    chosen = []
    for c, idx in enumerate(order):
        if correct_only:
            mine = idx[dd.rank::dd.world]
            ok_local = _predict_correct(net, prepare, data.images[mine], c, device, batch_size)
            ok = torch.zeros(idx.numel(), dtype=torch.int32)
            ok[dd.rank::dd.world] = ok_local.int()
            ok = dd.all_reduce_sum(ok.to(device)).cpu().bool()
            idx = idx[ok]
            if idx.numel() == 0:
                raise UserError(f"the model classifies no training image of class {c} ({data.class_names[c]}) "
                                "correctly; drop --correct-only or check the model and data")
        chosen.append(idx[:samples])
    observed = torch.tensor([int(i.numel()) for i in chosen], dtype=torch.int64)
    budgets = sorted({tangling_budget(int(o), n) for o in observed})
    count_dtype = torch.int16 if int(observed.max()) <= 32767 else torch.int32  # as compact as they allow

    nbytes = {p.name: (p.size + 7) // 8 for p in graph.points}
    active = {p.name: torch.zeros((n, nbytes[p.name]), dtype=torch.uint8) for p in graph.points}
    early = {k: {p.name: torch.zeros((n, nbytes[p.name]), dtype=torch.uint8) for p in graph.points}
             for k in budgets}
    early_classes = {k: {p.name: torch.zeros(p.shape, dtype=torch.int32) for p in graph.points} for k in budgets}
    recorded = {p.name: torch.zeros((n, *p.shape), dtype=torch.int32) for p in graph.points} if counts else None
    current: dict = {}

    def record(p: ObservationPoint, out: torch.Tensor) -> None:
        on = out > 0
        acc = current["acc"][p.name]
        acc["active"] |= on.any(0)
        positions = current["positions"]
        for k in budgets:
            first_k = positions < k
            if bool(first_k.any()):
                acc[k] |= on[first_k].any(0)
        if counts:
            acc["count"] += on.sum(0, dtype=torch.int32)

    total = sum(int(i[dd.rank::dd.world].numel()) for i in chosen)
    with hooks(net, graph.points, record), progress_bar("observing", total, show_progress and dd.is_main) as step:
        for c, idx in enumerate(chosen):
            current["acc"] = {p.name: {"active": torch.zeros(p.shape, dtype=torch.bool, device=device),
                                       **{k: torch.zeros(p.shape, dtype=torch.bool, device=device) for k in budgets},
                                       **({"count": torch.zeros(p.shape, dtype=torch.int32, device=device)}
                                          if counts else {})}
                              for p in graph.points}
            positions_all = torch.arange(idx.numel(), dtype=torch.int32)
            mine, positions_mine = idx[dd.rank::dd.world], positions_all[dd.rank::dd.world]
            for start in range(0, mine.numel(), batch_size):
                current["positions"] = positions_mine[start:start + batch_size].to(device)
                net(prepare(data.images[mine[start:start + batch_size]].to(device)))
                step(int(current["positions"].numel()))
            for p in graph.points:  # the class is done: combine the ranks' shards, then keep its bits
                acc = current["acc"][p.name]
                on = dd.all_reduce_max(acc["active"].to(torch.uint8)).bool().cpu()
                active[p.name][c] = pack_bits(on.reshape(-1))
                for k in budgets:
                    first_k = dd.all_reduce_max(acc[k].to(torch.uint8)).bool().cpu()
                    early[k][p.name][c] = pack_bits(first_k.reshape(-1))
                    early_classes[k][p.name] += first_k.to(torch.int32)
                if counts:
                    recorded[p.name][c] = dd.all_reduce_sum(acc["count"]).cpu()
    net.train(was_training)
    if counts:
        recorded = {k: v.to(count_dtype) for k, v in recorded.items()}
    return ActivationStats(graph.points, observed, active, early, early_classes, recorded,
                           {"ci_samples": samples, "seed": seed, "correct_only": correct_only})
