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
from .graph import ModelGraph, ObservationPoint

NEVER = torch.iinfo(torch.int32).max  # "first active at" for a node never active


@dataclass
class ActivationStats:
    """Per class and node: how many observed inputs made it active, and the first position that did."""

    points: list[ObservationPoint]
    count: dict[str, torch.Tensor]   # point -> int32 (n_classes, *shape)
    first: dict[str, torch.Tensor]   # point -> int32 (n_classes, *shape); NEVER where never active
    observed: torch.Tensor           # int64 (n_classes,): inputs observed per class
    settings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.observed.numel())

    @property
    def num_nodes(self) -> int:
        return sum(p.size for p in self.points)


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
            dd: Distributed | None = None, show_progress: bool = True) -> ActivationStats:
    """Observe up to ``samples`` training inputs of every class of ``data`` (labels = the model's outputs)."""
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

    count = {p.name: torch.zeros((n, *p.shape), dtype=torch.int32, device=device) for p in graph.points}
    first = {p.name: torch.full((n, *p.shape), NEVER, dtype=torch.int32, device=device) for p in graph.points}
    current: dict = {}

    def record(p: ObservationPoint, out: torch.Tensor) -> None:
        active = out > 0
        c, positions = current["class"], current["positions"]
        count[p.name][c] += active.sum(0, dtype=torch.int32)
        at = torch.where(active, positions.view(-1, *([1] * (active.dim() - 1))), NEVER)
        first[p.name][c] = torch.minimum(first[p.name][c], at.amin(0).to(torch.int32))

    total = sum(int(i[dd.rank::dd.world].numel()) for i in chosen)
    with hooks(net, graph.points, record), progress_bar("observing", total, show_progress and dd.is_main) as step:
        for c, idx in enumerate(chosen):
            positions_all = torch.arange(idx.numel(), dtype=torch.int32)
            mine, positions_mine = idx[dd.rank::dd.world], positions_all[dd.rank::dd.world]
            for start in range(0, mine.numel(), batch_size):
                current["class"] = c
                current["positions"] = positions_mine[start:start + batch_size].to(device)
                net(prepare(data.images[mine[start:start + batch_size]].to(device)))
                step(int(current["positions"].numel()))
    net.train(was_training)
    for p in graph.points:
        dd.all_reduce_sum(count[p.name])
        dd.all_reduce_min(first[p.name])
    return ActivationStats(graph.points, {k: v.cpu() for k, v in count.items()},
                           {k: v.cpu() for k, v in first.items()}, observed,
                           {"ci_samples": samples, "seed": seed, "correct_only": correct_only})
