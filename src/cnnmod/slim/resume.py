"""Slim modules pruned together, kept after every step so that a stopped decomposition goes on from the last one
(``cnnmod decompose --resume``; the state is :class:`cnnmod.runtime.Keep`'s). A pruner is kept as what it has
closed, in the source network's numbering, with its network's weights and statistics and its head: restored, it
is narrowed once to the same channels and given those tensors back, so that every later step computes what it
would have computed had the run never stopped."""

from __future__ import annotations

import time

import torch

from ..errors import UserError
from ..runtime import Keep
from .pruner import Pruner
from .schedule import prune_together

JOINT = "pruning-together"  # the part that holds every pruner after the last finished step it kept
KEEP_OVERHEAD = 9  # a step is kept once the steps since the last kept one took 9x as long as keeping it did


def pruner_tensors(p: Pruner, prefix: str) -> dict[str, torch.Tensor]:
    """``p``'s state: per source group the gate of every channel (0 where closed), the head rows, the network's
    weights and statistics."""
    tensors = {}
    for i, (group, gate, origin) in enumerate(zip(p.source_groups.groups, p.gates, p.origin, strict=True)):
        full = torch.zeros(group.channels, dtype=gate.dtype)
        full[origin] = gate.cpu()
        tensors[f"{prefix}.gate{i}"] = full
    tensors[f"{prefix}.w"], tensors[f"{prefix}.b"] = p.w, p.b
    tensors.update({f"{prefix}.net.{k}": v for k, v in p.net.state_dict().items()})
    return tensors


def restore_pruner(p: Pruner, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """``p`` (fresh, every channel open) back to the state :func:`pruner_tensors` kept."""
    device = p.gates[0].device
    p.gates = [tensors[f"{prefix}.gate{i}"].to(device) for i in range(len(p.gates))]
    p.checked = any(bool((g == 0).any()) for g in p.gates)  # a network with channels cut was verified
    p.narrow()
    net = f"{prefix}.net."
    p.net.load_state_dict({k[len(net):]: v for k, v in tensors.items() if k.startswith(net)})
    p.w, p.b = tensors[f"{prefix}.w"].clone(), tensors[f"{prefix}.b"].clone()


def pruned_together(pruners: dict[int, Pruner], size: float, keep: Keep | None,
                    some_made: bool = False) -> dict[int, list[dict]]:
    """:func:`~cnnmod.slim.schedule.prune_together` of the pruners of classes ``pruners``, going on from the last
    step an earlier run kept (``keep``) and keeping each step; the history of each class's module. A run whose
    modules were being made when it stopped (``some_made``) had finished its steps: its pruners (only those of
    the modules left to make) are restored from the last."""
    part = keep.read(JOINT) if keep is not None else None
    histories: dict[int, list[dict]] = {c: [] for c in pruners}
    finished = False
    if part is not None:
        config, tensors = part
        for c, p in pruners.items():
            restore_pruner(p, tensors, f"c{c}")
            histories[c] = config["histories"][str(c)]
        finished = config["finished"]
    if not finished:
        if some_made:
            raise UserError("the kept decomposition has modules made but its pruning unfinished: it was changed "
                            "by hand; start again with «overwrite»")

        last = {"at": time.perf_counter(), "writing": 0.0}

        def after_step(done: bool) -> None:
            # every step, or fewer where writing every pruner costs more than a tenth of the steps' time
            if not done and time.perf_counter() - last["at"] < KEEP_OVERHEAD * last["writing"]:
                return
            started = time.perf_counter()
            tensors = {k: v for c, p in pruners.items() for k, v in pruner_tensors(p, f"c{c}").items()}
            keep.write(JOINT, {"finished": done, "histories": {str(c): h for c, h in histories.items()}}, tensors)
            last["at"] = time.perf_counter()
            last["writing"] = last["at"] - started

        classes = list(pruners)
        prune_together([pruners[c] for c in classes], size, [histories[c] for c in classes],
                       after_step if keep is not None else None)
    return histories
