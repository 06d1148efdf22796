"""A user's network is run as it was trained: its normalisation is the user's to state, and cnnmod checks it.

cnnmod cannot know how a network it did not train saw its images: ``ToTensor()`` alone ([0, 1] inputs, the most
common case), a ``Normalize`` with the data's own statistics, 0.5/0.5, ImageNet's constants. Fed the wrong ones, a
network still runs and scores a few points lower, and every figure compared with it is silently off. So the
mean/std are stated (``cnnmod.wrap(net, data=..., mean=..., std=...)``, ``cnnmod import --mean --std``) and checked:
the network's accuracy on a few hundred of its training images under the stated normalisation against the usual
ones (:data:`USUAL`); where the stated one is clearly worse, or none was stated, one line names the one that fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..data.dataset import ImageSet
from ..data.transforms import InputSpec, to_input
from ..errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the normalisations networks are usually trained with, by what a person calls them
USUAL = (("[0, 1] inputs (ToTensor alone)", (0.0,), (1.0,)), ("0.5/0.5", (0.5,), (0.5,)),
         ("ImageNet's", IMAGENET_MEAN, IMAGENET_STD))
CHECK_IMAGES = 512  # training images the check runs the network on, under each normalisation
MIN_GAP = 0.02      # a normalisation is clearly worse when it loses at least 2 points of top-1 ...
MIN_Z = 3.0         # ... and the images it alone gets wrong outnumber those it alone gets right by 3 sigma


def values(v: float | Sequence[float], what: str) -> tuple[float, ...]:
    """A mean or std as stated: one number for every channel, or one per channel."""
    try:
        out = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise UserError(f"«{what}» must be a number or one number per channel, got {v!r}")
    if not out:
        raise UserError(f"«{what}» must be a number or one number per channel, got nothing")
    return out


def text(v: Sequence[float]) -> str:
    """Values as they are typed: ``0.485,0.456,0.406``."""
    return ",".join(f"{x:.4g}" for x in v)


def data_statistics(data: ImageSet, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data's own mean and std for a model of ``channels`` inputs: averaged where the channel counts differ."""
    def fitted(v) -> tuple[float, ...]:
        return tuple(v) if len(v) in (1, channels) else (sum(v) / len(v),)

    return fitted(data.mean), fitted(data.std)


def _candidates(spec: InputSpec, data: ImageSet) -> list[tuple[str, tuple, tuple]]:
    usual = [u for u in USUAL if len(u[1]) in (1, spec.channels)]
    return [("the data's own statistics", *data_statistics(data, spec.channels)), *usual]


def _sample(data: ImageSet, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    picked = data.take(order.sort().values)
    return torch.cat(list(picked.batches(n))), picked.labels


@torch.no_grad()
def _right(net: nn.Module, spec: InputSpec, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    device = next(net.parameters(), torch.zeros(0)).device
    right = []
    for start in range(0, len(images), 64):
        x = to_input(images[start:start + 64].to(device), spec)
        right.append(net(x).argmax(1).cpu() == labels[start:start + 64])
    return torch.cat(right)


def clearly_worse(right: torch.Tensor, best: torch.Tensor) -> bool:
    """Whether the images one normalisation gets right (``right``) are clearly fewer than another's (``best``):
    at least :data:`MIN_GAP` of them, and by :data:`MIN_Z` standard deviations of the images on which the two
    disagree (McNemar's test, paired on the same images)."""
    gained, lost = int((best & ~right).sum()), int((right & ~best).sum())
    return (gained - lost) / len(right) >= MIN_GAP and (gained - lost) / math.sqrt(max(gained + lost, 1)) >= MIN_Z


def check_preprocessing(net: nn.Module, spec: InputSpec | None, data: ImageSet, how: str) -> None:
    """Refuse a stated normalisation (``spec``) that is clearly worse for ``net`` on ``data`` (its training images)
    than a usual one, or no statement at all (``spec`` None), naming the one that fits. ``how`` says how a mean and
    std are stated where the message is read: ``{mean}`` and ``{std}`` are filled in."""
    if len(data) == 0:
        return
    base = spec or InputSpec(*data.input_shape, (0.0,), (1.0,))
    was = net.training
    net.eval()
    try:
        images, labels = _sample(data, CHECK_IMAGES)
        runs: dict[tuple, torch.Tensor] = {}  # each normalisation run once, the stated one among them

        def right(mean: tuple, std: tuple) -> torch.Tensor:
            if (mean, std) not in runs:
                runs[mean, std] = _right(net, replace(base, mean=mean, std=std), images, labels)
            return runs[mean, std]

        tried = [(name, mean, std, right(mean, std)) for name, mean, std in _candidates(base, data)]
        stated = right(tuple(spec.mean), tuple(spec.std)) if spec is not None else None
    finally:
        net.train(was)
    n = len(labels)
    name, mean, std, best = max(tried, key=lambda t: int(t[3].sum()))
    fix = how.format(mean=text(mean), std=text(std))
    scores = ", ".join(f"{t[0]} {100 * float(t[3].float().mean()):.1f} %" for t in tried)
    if stated is None:
        if all(int(t[3].sum()) < int(best.sum()) for t in tried if t[3] is not best):
            raise UserError(f"state the normalisation the model was trained with ({fix} fits best: top-1 on {n} "
                            f"of its training images: {scores}); cnnmod does not guess it")
        plain = how.format(mean="0", std="1")
        raise UserError(f"state the normalisation the model was trained with, e.g. {plain} for [0, 1] inputs "
                        f"(ToTensor alone) or your Normalize's constants; its training images do not tell the usual "
                        f"ones apart (top-1 on {n}: {scores}), and cnnmod does not guess it")
    if clearly_worse(stated, best):
        ours, theirs = 100 * float(stated.float().mean()), 100 * float(best.float().mean())
        raise UserError(f"the model scores {ours:.1f} % on {n} of its training images fed with mean "
                        f"{text(spec.mean)}, std {text(spec.std)}, but {theirs:.1f} % with {name}: it was not trained "
                        f"with the normalisation stated; give the one it was trained with ({fix} fits)")
