"""What modules and compositions cost to run: parameters, FLOPs (torch's flop counter) and measured latency,
each also as a fraction of the source model's.

A node-masked module (the paper's) holds all of its model's weights and runs the whole model, so its
fractions are about 1; a composition of K such modules costs about K model passes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .classifier import Classifier
from .compose import Composition
from .module import Module
from .slim import MergedSlim, SlimModule


def count_params(obj) -> int:
    """Parameters a classifier, module or composition needs: each source model's once plus the binary heads for
    node-masked modules; a slim module's own (smaller) network."""
    if isinstance(obj, Classifier):
        return sum(p.numel() for p in obj.net.parameters())
    if isinstance(obj, (SlimModule, MergedSlim)):
        return obj.params()  # its own (smaller) network
    parts = obj.modules_list if isinstance(obj, Composition) else [obj]
    masked = [m for m in parts if isinstance(m, Module)]
    sources = {id(m.source): m.source for m in masked}
    return (sum(count_params(s) for s in sources.values())
            + sum(m.head_weight.numel() + m.head_bias.numel() for m in masked)
            + sum(m.params() for m in parts if isinstance(m, SlimModule)))


@torch.no_grad()
def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> int:
    """FLOPs of ``fn`` on ``images``, per image."""
    with FlopCounterMode(display=False) as counter:
        fn(images)
    return int(counter.get_total_flops() // max(images.shape[0], 1))


@torch.no_grad()
def latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn`` on the batch ``images`` (after one warm-up run)."""
    fn(images)
    times = []
    for _ in range(repeats):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def _model_fn(source: Classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: source(source.prepare(images))


def cost_report(target, images: torch.Tensor, repeats: int = 3, source: Classifier | None = None) -> dict:
    """Parameters, FLOPs per image and latency of ``target`` (a module or composition) on the batch ``images``
    (uint8), with fractions of its source model's (for a composition across models, of the sum of its source
    models'; slim modules carry no source: give it as ``source``)."""
    target = target.eval()
    merged = isinstance(target, MergedSlim)
    parts = target.modules_list if isinstance(target, Composition) else [] if merged else [target]
    fn = target if isinstance(target, Composition) or merged else (lambda imgs: target.score(target.prepare(imgs)))
    sources = {id(m.source): m.source for m in parts if isinstance(m, Module)}
    if source is not None:
        sources.setdefault(id(source), source)
    if not sources:
        raise ValueError("cost_report needs the source model of slim modules")
    model_params = sum(count_params(s) for s in sources.values())
    model_flops = sum(count_flops(_model_fn(s), images[:1]) for s in sources.values())
    model_latency = sum(latency_ms(_model_fn(s), images, repeats) for s in sources.values())
    params, flops, latency = count_params(target), count_flops(fn, images[:1]), latency_ms(fn, images, repeats)
    return {"params": params, "flops": flops, "latency_ms": round(latency, 3),
            "params_fraction": round(params / model_params, 4), "flops_fraction": round(flops / model_flops, 4),
            "latency_fraction": round(latency / model_latency, 4), "latency_batch": int(images.shape[0]),
            "model_params": model_params, "model_flops": model_flops, "model_latency_ms": round(model_latency, 3)}
