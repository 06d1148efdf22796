"""Devices, seeds and the torchrun environment."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("«device» cuda was asked for but no CUDA device is available; use «device» cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda:"):
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if not index.isdigit():
            raise UserError(f"unknown device {name!r}; use cuda or cuda:N with N a GPU's number")
        if int(index) >= count:
            have = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise UserError(f"«device» {name}: this machine has {have}; use «device» cuda, cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Distributed:
    """Rank and world size; ``world == 1`` outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def check_same(self, digest: str, what: str) -> None:
        """Refuse a world whose ranks disagree on ``digest`` (a hex string), naming ``what`` they disagree on."""
        if not self.active:
            return
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=device)
        low, high = self.all_reduce_min(value.clone()), self.all_reduce_max(value.clone())
        if int(low) != int(high):
            raise UserError(f"the torchrun ranks see different {what}: give every rank the same data (the same "
                            "--data, --data-root and files on every machine)")

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (small results of our own processes)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


class Keep(Protocol):
    """Where a long run keeps what it has finished, so that a run stopped at any point goes on from there
    (:class:`cnnmod.jobs.checkpoints.DecompositionState`): named parts (a config and tensors), each written
    whole or not at all, and finished modules by class. What is kept, and when, is the work's own: the
    observation pass keeps each class's bits, slim modules each pruning step and each finished module."""

    def read(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None: ...

    def write(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None: ...

    def module(self, concerned: int, device: torch.device | str = "cpu"): ...

    def keep_module(self, module) -> None: ...


@dataclass(frozen=True)
class Passes:
    """How a job's passes over data run: on ``device`` (None: where the model is), ``batch_size`` inputs at a
    time, shared among torchrun's processes (``dd``), with a progress bar or without (``progress``; none either
    way where ``$CNNMOD_NO_PROGRESS`` is set); ``keep``: where a stopped run's finished work is kept (None: it
    is not)."""

    device: torch.device | str | None = None
    batch_size: int = 256
    dd: Distributed = field(default_factory=Distributed)
    progress: bool = True
    keep: Keep | None = None


class Clock:
    """Seconds spent in a job's named phases (``with clock("calibration"): ...``), summed over every time a phase
    runs: what a job reports of its parts, however the work inside is cut."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def rounded(self, *phases: str) -> dict[str, float]:
        """``{phase}_seconds`` of each of ``phases`` (0 where it never ran), to the millisecond."""
        return {f"{p}_seconds": round(self.seconds.get(p, 0.0), 3) for p in phases}


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend)
        else:  # torchrun keeps its store over restarts (--max-restarts): each attempt's keys apart, or a restarted
            # worker reads the dead one's addresses
            store, rank, world = next(dist.rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"cnnmod/attempt{attempt}/", store), rank=rank,
                                    world_size=world)
    return Distributed(rank, world, local_rank), device


def leave_together() -> None:
    """Under torchrun, after a command succeeded: wait until every rank is done before any destroys its process
    group. Rank 0 alone writes the results; the other ranks used to tear down their gloo connections meanwhile,
    and once in CI one of them died with SIGABRT there (not reproduced in 15 runs here). Not after an error: the
    ranks may then wait in different collectives."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
