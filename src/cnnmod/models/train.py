"""The one training loop: seeded, torchrun-aware, keeping the best-validation checkpoint and the last epoch.

Under ``torchrun --nproc-per-node=N`` each process trains on its shard of every epoch's permutation
(a distributed sampler over tensors: the permutation is padded so every rank has the same number of
batches) inside DistributedDataParallel; ``--batch-size`` is per process, as in torchvision's reference
scripts. Validation counts are summed over ranks; only rank 0 writes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.metrics import predict_scores, topk_correct
from ..data.dataset import ImageSet
from ..data.transforms import Augment, InputSpec, to_input
from ..errors import UserError
from ..progress import progress_bar
from ..runtime import Distributed, Passes


@dataclass
class TrainSettings:
    arch: str
    data: str
    arch_args: dict = field(default_factory=dict)
    classes: list[int] | None = None
    subset: int | None = None
    val_split: float = 0.1
    epochs: int = 15
    batch_size: int = 128
    lr: float | None = None  # sgd: 0.1 (0.02 without BatchNorm), adam: 0.001
    optimizer: str = "sgd"
    weight_decay: float | None = None  # sgd: 5e-4, adam: 0
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    input_size: list[int] | None = None  # (height, width) the model takes; images are resized to it
    balanced: bool = False  # draw every epoch's images class-balanced (with replacement); select on balanced val

    def resolved(self) -> TrainSettings:
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; use sgd or adam")
        if self.epochs < 1:
            raise UserError("«epochs» must be at least 1")
        if self.batch_size < 2:
            raise UserError("«batch_size» must be at least 2")
        if not 0 <= self.val_split < 1:
            raise UserError("«val_split» must be in [0, 1)")
        if self.subset is not None and self.subset < 2:
            raise UserError("«subset» must be at least 2 images")
        # SGD at 0.1 suits BatchNorm; BatchNorm-free networks diverge there and train at 0.02
        sgd_lr = 0.02 if self.arch_args.get("bn") is False else 0.1
        lr = self.lr if self.lr is not None else (sgd_lr if self.optimizer == "sgd" else 1e-3)
        wd = self.weight_decay if self.weight_decay is not None else (5e-4 if self.optimizer == "sgd" else 0.0)
        if lr <= 0:
            raise UserError("«lr» must be positive")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise UserError(f"«input_size» takes HEIGHTxWIDTH, e.g. 28x28, not {self.input_size}")
        return TrainSettings(**{**asdict(self), "lr": lr, "weight_decay": wd})


def require_in_memory(train: ImageSet) -> None:
    if train.streamed:
        raise UserError(f"{train.name} is streamed from disk ({len(train)} images), and cnnmod trains from memory: "
                        "train the model elsewhere and bring it in with cnnmod import")


def _schedule(total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / max(warmup, 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, nesterov=True, weight_decay=s.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per image: 1 / (images of its class), so every class is drawn equally often."""
    counts = torch.bincount(labels.cpu())
    return 1.0 / counts[labels.cpu()].double()


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, dd: Distributed,
                  weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """This rank's batches of one epoch: a seeded permutation (or, with per-image ``weights``, n seeded draws
    with replacement), padded to a multiple of the world size."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    if weights is None:
        perm = torch.randperm(n, generator=gen)
    else:
        perm = torch.multinomial(weights, n, replacement=True, generator=gen)
    if dd.active:
        pad = (-n) % dd.world
        perm = torch.cat([perm, perm[:pad]])[dd.rank::dd.world]
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:  # BatchNorm cannot train on a batch of one
        batches.pop()
    return batches


@torch.no_grad()
def _val_accuracy(model: nn.Module, val: ImageSet, spec: InputSpec, device: torch.device, dd: Distributed,
                  balanced: bool = False) -> float:
    """Validation top-1 (``balanced``: the mean over classes of each class's top-1)."""
    model.eval()
    idx = torch.arange(len(val))[dd.rank::dd.world]
    scores = predict_scores(model, lambda x: to_input(x, spec), val.images[idx], device)
    hits = topk_correct(scores, val.labels[idx], 1).float().cpu()
    labels = val.labels[idx].cpu()
    k = val.num_classes
    counts = torch.stack([torch.zeros(k).index_add_(0, labels, hits), torch.bincount(labels, minlength=k).float()])
    counts = dd.all_reduce_sum(counts)
    if balanced:
        present = counts[1] > 0
        return 100.0 * float((counts[0][present] / counts[1][present]).mean())
    return 100.0 * float(counts[0].sum() / counts[1].sum().clamp(min=1))


def fit(model: nn.Module, sets: tuple[ImageSet, ImageSet | None], spec: InputSpec, s: TrainSettings,
        augment: Augment, passes: Passes, start: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place on ``sets`` (training split, validation split or None), on ``passes.device`` among
    ``passes.dd``'s processes (``s.batch_size`` images a step); returns history and the best-validation state dict
    (on the CPU). ``start``: the state of a run that stopped after an epoch (:mod:`cnnmod.models.resume`), to go on
    from; ``on_epoch(state)`` is called on every process after every epoch with that state (the same on every
    process: each one's augmentation generator is gathered into it)."""
    train, val = sets
    device, dd, show_progress = torch.device(passes.device), passes.dd, passes.progress
    require_in_memory(train)
    net = model
    if dd.active:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(model, s)
    weights = class_weights(train.labels) if s.balanced else None
    steps_per_epoch = len(epoch_batches(len(train), s.batch_size, 0, s.seed, dd, weights))
    total = steps_per_epoch * s.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, min(steps_per_epoch, total // 10)))
    images = train.images.to(device) if device.type == "cuda" else train.images
    labels = train.labels.to(device)
    gen = torch.Generator().manual_seed(s.seed * 7919 + dd.rank)
    history, best_state, best_val, best_epoch = [], None, -1.0, 0
    train_seconds, seen, step, first, earlier = 0.0, 0, 0, 1, 0.0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        _set_generators(start, gen, device, dd)
        history, best_state, best_val, best_epoch = start["history"], start["best_state"], start["best_val"], \
            start["best_epoch"]
        train_seconds, seen, step, earlier = start["train_seconds"], start["images_seen"], start["step"], \
            start["wall_seconds"]
        first = start["epoch"] + 1
    began = time.perf_counter()
    with progress_bar(f"train {s.arch}", total=total, enabled=show_progress and dd.is_main) as advance:
        if step:
            advance(step, epoch=f"{first - 1}/{s.epochs}")
        for epoch in range(first, s.epochs + 1):
            net.train()
            t0 = time.perf_counter()
            loss_sum, correct, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
            for batch in epoch_batches(len(train), s.batch_size, epoch, s.seed, dd, weights):
                xb = images[batch.to(images.device)].to(device, non_blocking=True)
                if s.augment:
                    xb = augment(xb, gen)
                x, y = to_input(xb, spec), labels[batch.to(device)]
                out = net(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * y.numel()
                correct += (out.detach().argmax(1) == y).sum()
                count += y.numel()
                step += 1
                if step % 20 == 1:  # reading the loss synchronises a GPU: not every step
                    advance(1, epoch=f"{epoch}/{s.epochs}", loss=f"{float(loss.detach()):.3f}")
                else:
                    advance(1)
            train_seconds += time.perf_counter() - t0
            seen += count * dd.world
            row = {"epoch": epoch, "train_loss": round(float(loss_sum) / max(count, 1), 5),
                   "train_top1": round(100.0 * float(correct) / max(count, 1), 3),
                   "seconds": round(time.perf_counter() - t0, 3)}
            if val is not None:
                row["val_top1"] = round(_val_accuracy(model, val, spec, device, dd, s.balanced), 3)
                if row["val_top1"] > best_val:
                    best_val, best_epoch = row["val_top1"], epoch
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            history.append(row)
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "best_state": best_state, "best_val": best_val,
                          "best_epoch": best_epoch, "history": history, "train_seconds": train_seconds,
                          "images_seen": seen, "step": step,
                          "wall_seconds": earlier + time.perf_counter() - began, **_generators(gen, device, dd)})
    if best_state is None:  # no validation split: the last epoch is the one kept
        best_state, best_epoch = {k: v.detach().cpu() for k, v in model.state_dict().items()}, s.epochs
    return {"history": history, "best_state": best_state, "best_epoch": best_epoch,
            "train_seconds": train_seconds, "images_seen": seen, "resumed_after": first - 1,
            "earlier_seconds": earlier}


def _generators(gen: torch.Generator, device: torch.device, dd: Distributed) -> dict:
    """The random generators the loop draws from: the global one (dropout; CUDA's on a GPU) and every
    process's augmentation generator, gathered (a process's row of a zero matrix, summed over processes)."""
    mine = gen.get_state().long()
    rows = torch.zeros(dd.world, mine.numel(), dtype=torch.long)
    rows[dd.rank] = mine
    if dd.active:
        rows = dd.all_reduce_sum(rows.to(device)).cpu()
    kept = {"rng": torch.get_rng_state(), "augment": rows.to(torch.uint8)}
    if device.type == "cuda":
        kept["cuda_rng"] = torch.cuda.get_rng_state(device)
    return kept


def _set_generators(start: dict, gen: torch.Generator, device: torch.device, dd: Distributed) -> None:
    """The generators as :func:`_generators` kept them (this process's own augmentation generator)."""
    if start["augment"].shape[0] != dd.world:
        raise UserError(f"the run to resume trained on {start['augment'].shape[0]} process(es), not {dd.world}: "
                        "go on with as many (torchrun --nproc-per-node)")
    torch.set_rng_state(start["rng"])
    gen.set_state(start["augment"][dd.rank].clone())
    if device.type == "cuda" and "cuda_rng" in start:
        torch.cuda.set_rng_state(start["cuda_rng"], device)
