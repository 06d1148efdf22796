"""The pruning schedule (docs/method.md, "Slim modules"): what one step closes and when pruning stops. Every step
ranks the open channels by importance per cost (the pruner's :class:`~cnnmod.slim.importance.Importance`), closes
the least important until ``step`` of the kept parameters are cut, then refreshes BatchNorm and the head; after
the last step the recipe's recoveries run (:mod:`.recovery`). :func:`prune` is one pruner's schedule,
:func:`prune_together` several modules' pruners to one shared budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..errors import UserError
from ..progress import progress_bar
from .config import SlimSettings
from .pruner import Pruner
from .recovery import recover

Ranked = list[tuple[float, int, int]]  # (importance per cost, group, channel), least important first


def candidates(pruner: Pruner) -> Ranked:
    """The open channels that may close (every group keeps one), least important first, by importance per the
    share of the model's parameters (or FLOPs) each costs."""
    scores = pruner.importance(pruner.view())
    found = []
    for i, sc in enumerate(scores):
        kept = torch.nonzero(pruner.gates[i].cpu() > 0).flatten()
        if kept.numel() > 1:
            value = sc[kept] / pruner.rank_cost[i]
            found += [(float(value[j]), i, int(kept[j])) for j in range(kept.numel())]
    found.sort()
    return found


def step_share(s: SlimSettings, fraction: float, size: float | None = None) -> float:
    """The share of the model's parameters one step cuts at ``fraction``: ``step`` of it, never below ``size``
    (default ``s.size``), and at least a quarter step."""
    size = s.size if size is None else size
    return max(min(s.step * fraction, fraction - size), s.step * fraction / 4)


def out_of_reach(size: float, arch: str, fraction: float, reached: str) -> UserError:
    """The one-line error for a size no step can reach: every group is down to one channel at ``fraction``."""
    least = math.ceil(fraction * 1e4) / 1e4
    return UserError(f"«size» {size:g} is out of reach for {arch}: every channel group keeps at least one channel, "
                     f"so {reached} {least:g} of the parameters; ask for «size» {least:g} or more")


def channels_within_budget(ranked: list[tuple[float, int, int, int]], budget: float, pruners: list[Pruner],
         caps: list[float] | None = None) -> list[tuple[int, int, int]]:
    """The (pruner, group, channel)s of ``ranked`` ((importance per cost, pruner, group, channel), least important
    first) that one step closes: in order until ``budget`` parameters are spent, every group keeping one channel,
    and with ``caps``, no pruner giving more than its cap."""
    quota = {(k, i): int((g > 0).sum()) - 1 for k, p in enumerate(pruners) for i, g in enumerate(p.gates)}
    given = [0.0] * len(pruners)
    chosen, spent = [], 0.0
    for _, k, i, j in ranked:
        if spent >= budget:
            break
        cost = pruners[k].per_channel[i]
        if quota[k, i] > 0 and (caps is None or given[k] + cost <= caps[k]):
            chosen.append((k, i, j))
            quota[k, i] -= 1
            given[k] += cost
            spent += cost
    return chosen


def close_channels(pruner: Pruner, chosen: list[tuple[int, int]], ranked: Ranked) -> int:
    """Close the ``chosen`` (group, channel)s, then, with ``multiple``, the least important of ``ranked`` that
    bring each group's count to a multiple of it (when above it); how many closed."""
    for i, j in chosen:
        pruner.gates[i][j] = 0.0
    closed = len(chosen)
    multiple = pruner.s.multiple
    if multiple > 1:  # convolutions cost in blocks of channels
        least_first: dict[int, list[int]] = {}
        for _, i, j in ranked:
            least_first.setdefault(i, []).append(j)
        for i, gate in enumerate(pruner.gates):
            kept = int((gate > 0).sum())
            extra = kept % multiple if kept > multiple else 0
            for j in least_first.get(i, []):
                if extra == 0:
                    break
                if gate[j] > 0:
                    gate[j] = 0.0
                    extra -= 1
                    closed += 1
    return closed


def close_step(pruner: Pruner, fraction: float) -> int:
    """One step's closing at ``fraction`` of the model's parameters: the least important open channels until the
    step's share (:func:`step_share`) is spent; how many closed."""
    ranked = candidates(pruner)
    budget = step_share(pruner.s, fraction) * pruner.total_params
    chosen = channels_within_budget([(v, 0, i, j) for v, i, j in ranked], budget, [pruner])
    return close_channels(pruner, [(i, j) for _, i, j in chosen], ranked)


class Exhausted(Exception):  # noqa: N818 -- a state of the schedule, not an error of the user's
    """No channel can close: every group is down to one, at ``fraction`` of the model's parameters."""

    def __init__(self, fraction: float) -> None:
        super().__init__(fraction)
        self.fraction = fraction


def steps(pruner: Pruner, history: list[dict]) -> Iterator[tuple[tuple, float]]:
    """One pruner's steps down to ``size``: each closes the least important channels until a step's share of the
    parameters is spent, refreshes, and yields what undoes it (:meth:`Pruner.snapshot`) with the share the
    sliced network had before it. The share is added to ``history`` before every step; the schedule ends when it
    is at most ``size``, or raises :class:`Exhausted` when no channel can close."""
    while True:
        fraction = pruner.record(history)
        if fraction <= pruner.s.size:
            return
        previous = pruner.snapshot()
        if close_step(pruner, fraction) == 0:
            raise Exhausted(fraction)
        pruner.refresh()
        yield previous, fraction


def prune(pruner: Pruner, accuracy: Callable[[], float] | None = None, reference: float | None = None) -> list[dict]:
    """Close channels until the sliced network holds at most ``size`` of the model's parameters, or (with
    ``accuracy``, a function of the current state, and ``max_loss``) until the next step would put it more than
    ``max_loss`` points under ``reference`` (default: its accuracy before pruning); then the recoveries. The
    history of the way down."""
    s, history = pruner.s, []
    start = (reference if reference is not None else accuracy()) if accuracy is not None else None
    try:
        for previous, _ in steps(pruner, history):
            lost = start - accuracy() if start is not None else None
            if lost is not None and lost > s.max_loss:
                # not even the first step meets it: the slim module would be the whole model (a merged composition
                # keeps its union instead: what it was made from)
                if pruner.binary and len(history) == 1:
                    raise UserError(f"«max_loss» {s.max_loss:g} pp cannot be met: the first pruning step (to "
                                    f"{pruner.fraction():.4f} of the parameters) already loses {lost:.2f} pp of "
                                    "held-out accuracy; give a larger «max_loss», or keep the model whole")
                pruner.restore(previous)
                pruner.refresh()
                break
    except Exhausted as e:  # every group is down to one channel: as far as a loss bound or the default size can
        if accuracy is None and not s.default_size:  # go; a size asked for is out of reach
            raise out_of_reach(s.size, pruner.source.arch, e.fraction, "the smallest it reaches is") from None
    recover(pruner, accuracy, start - s.max_loss if start is not None else None)
    return history


def prune_together(pruners: list[Pruner], size: float, histories: list[list[dict]] | None = None,
                   after_step: Callable[[bool], None] | None = None) -> list[list[dict]]:
    """Prune slim modules' pruners (one margin each, the same source) together until their sliced networks hold
    ``size`` of the model's parameters on average: every step ranks the open channels of all of them on one scale
    (importance per cost: each module's loss is the same class-balanced binary loss, so a channel that an easy
    class's module can spare goes before one a hard class's needs) and closes the least important until ``step``
    of all the kept parameters are cut, no module giving more than twice ``step`` of its own. Each module's
    BatchNorm statistics and head are refreshed after each step it lost channels in; each keeps at least one
    channel per group. The history of each module's way down (``histories``: as far as a stopped run had come,
    its pruners restored to where it stopped); ``after_step(finished)`` is called after every step and once the
    last is done. Each one's recoveries are the caller's (:func:`~cnnmod.slim.recovery.recover`)."""
    histories = histories if histories is not None else [[] for _ in pruners]
    with progress_bar("pruning together", len(pruners)) as advance:
        _steps_together(pruners, size, histories, advance, after_step or (lambda finished: None))
    return histories


def _steps_together(pruners: list[Pruner], size: float, histories: list[list[dict]], advance, after_step) -> None:
    s, total, done = pruners[0].s, pruners[0].total_params, 0.0
    while True:
        fractions = [p.record(h) for p, h in zip(pruners, histories, strict=True)]
        mean = sum(fractions) / len(fractions)
        # the bar: how far the mean has come from the whole model down to ``size``
        reached = len(pruners) * min(1.0, (1 - mean) / max(1 - size, 1e-9))
        advance(reached - done, params=f"{mean:.2f}")
        done = reached
        if mean <= size:
            break
        ranked = sorted((v, k, i, j) for k, p in enumerate(pruners) for v, i, j in candidates(p))
        budget = step_share(s, mean, size) * total * len(pruners)
        caps = [2 * s.step * f * total for f in fractions]
        chosen = channels_within_budget(ranked, budget, pruners, caps)
        if not chosen:
            if s.default_size:  # as far as they go: the run says so
                break
            raise out_of_reach(size, pruners[0].source.arch, mean, "its modules reach on average")
        for k, p in enumerate(pruners):
            mine = [(i, j) for kk, i, j in chosen if kk == k]
            if mine:
                close_channels(p, mine, [(v, i, j) for v, kk, i, j in ranked if kk == k])
                p.refresh()
        after_step(False)
    after_step(True)
