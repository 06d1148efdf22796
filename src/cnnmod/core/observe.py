"""Activation statistics at the observation points: the one pass every decomposition is computed from.

docs/method.md, "Concern and tangling identification": module c keeps node j iff some observed input of c made
it active, or one of the first k inputs of some other class did. The pass keeps exactly that, as bits
(:class:`ActivationStats`): per class and node "active" and "active among the first k" for every budget k in
use, plus per node whether at least one class and at least two have the second bit, so memory is 2 bits
per class and node. Classes go
through one after another; bit tables larger than a bound live in memory-mapped files (:class:`Spill`).

The pass is batched, runs on CPU or CUDA, streams its inputs from disk when the set is streamed, and is
torchrun-aware: each rank observes a shard of every class's inputs (positions stay global), the ranks first
check that they see the same data, and each class's bits are combined with all-reduce (max).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.dataset import ImageSet
from ..errors import UserError
from ..progress import progress_bar
from ..runtime import Distributed, Passes
from .bits import or_rows, pack_bits, unpack_bits
from .graph import ModelGraph, ObservationPoint


@dataclass
class ActivationStats:
    """What concern and tangling identification need of the observed inputs, as bits (docs/method.md, "One
    observation pass"): per class and node, whether some observed input of the class made it active
    (``active``), and for every tangling budget k in use, whether one of the class's first k inputs did
    (``early[k]``), with per node whether that holds for at least one class and for at least two
    (``early_classes[k]``: "active among the first k of some class other than c" is "two or more", or "one"
    without c's own bit). Bits are packed eight nodes a byte, so memory is 2 bits per class and node, not the
    8 bytes of two counters. Activation counts, which only the ``tau`` switch needs, are kept only when asked
    for (int16 where at most 32,767 inputs of a class are observed)."""

    points: list[ObservationPoint]
    observed: torch.Tensor                           # int64 (n_classes,): inputs observed per class
    active: dict[str, torch.Tensor]                  # point -> uint8 (n_classes, ceil(size / 8))
    early: dict[int, dict[str, torch.Tensor]]        # k -> point -> uint8 (n_classes, ceil(size / 8))
    early_classes: dict[int, dict[str, torch.Tensor]]  # k -> point -> uint8 (2, ceil(size / 8)): >= 1, >= 2
    counts: dict[str, torch.Tensor] | None = None    # point -> (n_classes, *shape) when recorded
    settings: dict = field(default_factory=dict)
    spill: Spill | None = field(default=None, repr=False)  # the files the bits live in, when spilled to disk

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
        return unpack_bits(or_rows(self.active[point.name]), point.size).reshape(point.shape)

    def others_early(self, point: ObservationPoint, c: int, k: int) -> torch.Tensor:
        """Bool (*shape): nodes active among the first k observed inputs of some class other than c."""
        if k not in self.early:
            raise ValueError(f"the observation pass recorded no tangling budget {k} (has {sorted(self.early)})")
        once, twice = self.early_classes[k][point.name]
        others = twice | (once & ~self.early[k][point.name][c])  # packed: eight nodes per operation
        return unpack_bits(others, point.size).reshape(point.shape)

    def count(self, point: ObservationPoint, c: int) -> torch.Tensor:
        if self.counts is None:
            raise UserError("this observation pass recorded no activation counts, which tau > 0 needs; observe "
                            "again with counts=True")
        return self.counts[point.name][c]


SPILL_ABOVE = int(os.environ.get("CNNMOD_SPILL_ABOVE", str(4 << 30)))  # bytes of bits kept in memory at most


class Spill:
    """Bit tables in files instead of memory (memory-mapped; the OS keeps what fits): for observation passes
    whose bits would pass :data:`SPILL_ABOVE`. The files are allocated in full up front, so a disk without
    room fails at once with ENOSPC rather than midway, and they are removed with this object."""

    def __init__(self, where: str | None = None) -> None:
        where = where or os.environ.get("CNNMOD_SPILL_DIR")
        self.folder = tempfile.TemporaryDirectory(prefix="cnnmod-bits-", dir=where)
        self.count = 0

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        path = Path(self.folder.name) / f"{self.count}.bits"
        self.count += 1
        kind = np.dtype(str(dtype).removeprefix("torch."))
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(1, math.prod(shape) * kind.itemsize))
        return torch.from_numpy(np.memmap(path, dtype=kind, mode="r+", shape=shape))

    @property
    def path(self) -> Path:
        return Path(self.folder.name)


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


def _chunks(order: list[torch.Tensor], dd: Distributed, batch_size: int) -> list[list[torch.Tensor]]:
    """Per class, this rank's share of its inputs (every world-th, so positions stay global) in batches."""
    return [list(idx[dd.rank::dd.world].split(batch_size)) if idx.numel() > dd.rank else [] for idx in order]


@torch.no_grad()
def _correct(net: nn.Module, prepare, data: ImageSet, order: list[torch.Tensor], device: torch.device,
             batch_size: int, dd: Distributed) -> list[torch.Tensor]:
    """Per class, whether the model classifies each of its inputs (in ``order``) as the class; one pass, sharded."""
    per_class = _chunks(order, dd, batch_size)
    flat = [chunk for chunks in per_class for chunk in chunks]
    owners = [c for c, chunks in enumerate(per_class) for _ in chunks]
    hits = {c: [] for c in range(len(order))}
    for c, x in zip(owners, data.batched(flat), strict=True):
        hits[c].append((net(prepare(x.to(device))).argmax(1) == c).cpu())
    out = []
    for c, idx in enumerate(order):
        ok = torch.zeros(idx.numel(), dtype=torch.int32)
        if hits[c]:
            ok[dd.rank::dd.world] = torch.cat(hits[c]).int()
        out.append(dd.all_reduce_sum(ok.to(device)).cpu().bool())
    return out


@dataclass(frozen=True)
class Sampling:
    """Which inputs an observation pass reads and what it keeps: up to ``samples`` of every class in its seeded
    order (``seed``), only those the model gets right (``correct_only``), and activation counts beside the bits
    (``counts``, for ``tau``)."""

    samples: int = 1000
    seed: int = 0
    correct_only: bool = False
    counts: bool = False


@torch.no_grad()
def observe(net: nn.Module, graph: ModelGraph, prepare, data: ImageSet, sampling: Sampling = Sampling(),
            passes: Passes = Passes(), spill_above: int | None = None) -> ActivationStats:
    """Observe the training inputs of every class of ``data`` that ``sampling`` picks (labels = the model's
    outputs), one class after another, run as ``passes`` says. Bits that would take more than ``spill_above``
    bytes (default :data:`SPILL_ABOVE`, 4 GiB) live in memory-mapped files (:class:`Spill`). With
    ``passes.keep``, each class's bits are kept once observed, and classes an earlier run kept are not observed
    again (a class's bits do not depend on the others', so the stats are the same bits)."""
    samples, seed, correct_only, counts = sampling.samples, sampling.seed, sampling.correct_only, sampling.counts
    dd, batch_size, show_progress = passes.dd, passes.batch_size, passes.progress
    device = torch.device(passes.device) if passes.device is not None else next(net.parameters()).device
    n = data.num_classes
    if samples < 1:
        raise UserError(f"«ci_samples» must be at least 1, got {samples}")
    order = class_order(data.labels, n, seed)
    for c, idx in enumerate(order):
        if idx.numel() == 0:
            raise UserError(f"class {c} ({data.class_names[c]}) has no training images; decomposition needs "
                            "inputs of every class")
    if dd.active:
        dd.check_same(data.digest(), f"training data ({data.name})")
    was_training = net.training
    net.eval()
    chosen = []
    correct = _correct(net, prepare, data, order, device, batch_size, dd) if correct_only else None
    for c, idx in enumerate(order):
        if correct is not None:
            idx = idx[correct[c]]
            if idx.numel() == 0:
                raise UserError(f"the model classifies no training image of class {c} ({data.class_names[c]}) "
                                "correctly; drop correct_only or check the model and data")
        chosen.append(idx[:samples])
    observed = torch.tensor([int(i.numel()) for i in chosen], dtype=torch.int64)
    budgets = sorted({tangling_budget(int(o), n) for o in observed})
    count_dtype = torch.int16 if int(observed.max()) <= 32767 else torch.int32  # as compact as they allow

    nbytes = {p.name: (p.size + 7) // 8 for p in graph.points}
    needed = n * sum(nbytes.values()) * (1 + len(budgets))
    if counts:  # (n_classes, *shape) counts in the narrowest type that holds them
        needed += n * sum(p.size for p in graph.points) * count_dtype.itemsize
    spill = Spill() if needed > (SPILL_ABOVE if spill_above is None else spill_above) else None

    def table(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return spill.zeros(shape, dtype) if spill is not None else torch.zeros(shape, dtype=dtype)

    active = {p.name: table((n, nbytes[p.name])) for p in graph.points}
    early = {k: {p.name: table((n, nbytes[p.name])) for p in graph.points} for k in budgets}
    early_classes = {k: {p.name: torch.zeros((2, nbytes[p.name]), dtype=torch.uint8) for p in graph.points}
                     for k in budgets}
    recorded = {p.name: table((n, *p.shape), count_dtype) for p in graph.points} if counts else None
    current: dict = {}

    def record(p: ObservationPoint, out: torch.Tensor) -> None:
        # "some input of the batch made the node active" is its maximum over the batch being positive: one
        # reduction, no boolean copy of the activations
        acc = current["acc"][p.name]
        on = out.amax(0) > 0
        acc["active"] |= on
        size = out.shape[0]
        for k, m in current["early"].items():  # the batch's inputs among the class's first k: a prefix of it
            if m:
                acc[k] |= on if m == size else out[:m].amax(0) > 0
        if counts:
            acc["count"] += (out > 0).sum(0, dtype=torch.int32)

    def combined(t: torch.Tensor) -> torch.Tensor:
        """One class's bits of this rank, or-ed over the ranks, on the CPU."""
        if dd.active:
            t = dd.all_reduce_max(t.to(torch.uint8)).bool()
        return t.cpu()

    def keep_class(c: int) -> dict[str, torch.Tensor]:
        """Class c's bits, as an earlier run kept them (``passes.keep``) or to keep them once combined."""
        rows = {f"active.{p.name}": active[p.name][c] for p in graph.points}
        rows.update({f"early{k}.{p.name}": early[k][p.name][c] for k in budgets for p in graph.points})
        rows.update({f"count.{p.name}": recorded[p.name][c] for p in graph.points} if counts else {})
        return rows

    def add_early(c: int) -> None:
        for k in budgets:
            for p in graph.points:
                once, twice = early_classes[k][p.name]
                bits = early[k][p.name][c]
                twice |= once & bits  # a second class has the bit
                once |= bits

    done = set()  # classes an earlier run of the same settings observed and kept (every rank reads the same)
    if passes.keep is not None:
        for c in range(n):
            part = passes.keep.read(f"observed-c{c:05d}")
            if part is not None:
                for key, row in keep_class(c).items():
                    row.copy_(part[1][key])
                add_early(c)
                done.add(c)
        dd.barrier()
    per_class = _chunks(chosen, dd, batch_size)
    batches = iter(data.batched([chunk for c, chunks in enumerate(per_class) if c not in done for chunk in chunks]))
    total = sum(int(chunk.numel()) for c, chunks in enumerate(per_class) if c not in done for chunk in chunks)
    with hooks(net, graph.points, record), progress_bar("observing", total, show_progress and dd.is_main) as step:
        current["acc"] = {p.name: {"active": torch.zeros(p.shape, dtype=torch.bool, device=device),
                                   **{k: torch.zeros(p.shape, dtype=torch.bool, device=device) for k in budgets},
                                   **({"count": torch.zeros(p.shape, dtype=torch.int32, device=device)}
                                      if counts else {})}
                          for p in graph.points}
        for c, idx in enumerate(chosen):
            if c in done:
                continue
            if c:
                for acc in current["acc"].values():  # one class's accumulators, cleared for the next
                    for t in acc.values():
                        t.zero_()
            positions = torch.arange(idx.numel(), dtype=torch.int32)[dd.rank::dd.world]
            start = 0
            for chunk in per_class[c]:
                batch_positions = positions[start:start + chunk.numel()]  # ascending on every rank
                current["early"] = {k: int((batch_positions < k).sum()) for k in budgets}
                start += chunk.numel()
                net(prepare(next(batches).to(device)))
                step(int(chunk.numel()))
            for p in graph.points:  # the class is done: combine the ranks' shards, then keep its bits
                acc = current["acc"][p.name]
                active[p.name][c] = pack_bits(combined(acc["active"]).reshape(-1))
                for k in budgets:
                    early[k][p.name][c] = pack_bits(combined(acc[k]).reshape(-1))
                if counts:
                    recorded[p.name][c] = dd.all_reduce_sum(acc["count"]).cpu().to(count_dtype)
            add_early(c)
            if passes.keep is not None and dd.is_main:
                passes.keep.write(f"observed-c{c:05d}", {"class": c}, keep_class(c))
    net.train(was_training)
    return ActivationStats(graph.points, observed, active, early, early_classes, recorded,
                           {"ci_samples": samples, "seed": seed, "correct_only": correct_only}, spill)
