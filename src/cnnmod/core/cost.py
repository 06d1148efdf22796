"""What modules and compositions cost to run: parameters, FLOPs (torch's flop counter) and measured latency,
each also as a fraction of the source model's.

A node-level module (the paper's) holds all of its model's weights and runs the whole model, so its
fractions are about 1; a composition of K such modules costs about K model passes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.utils.benchmark as benchmark
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(obj) -> int:
    """Parameters a classifier, module or composition needs to run (``obj.params()``: a composition counts each
    source model once plus the modules' own parameters, the two-way heads of node-level modules or the whole
    smaller network of a slim one)."""
    return obj.params()


@contextmanager
def attention_counted() -> Iterator[None]:
    """Every attention computed in ops torch's flop counter sees: ``nn.MultiheadAttention``'s fused fast path
    (taken under eval and no_grad, one op the counter does not count) off, and ``scaled_dot_product_attention``
    run as its math (its matmuls counted; the fused CPU and CUDA kernels are not). The results are the same."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@torch.no_grad()
def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> int:
    """FLOPs of ``fn`` on ``images``, per image (a multiply-add counts two), attention included
    (:func:`attention_counted`)."""
    with attention_counted(), FlopCounterMode(display=False) as counter:
        fn(images)
    return int(counter.get_total_flops() // max(images.shape[0], 1))


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """Milliseconds of one run of ``fn`` on ``images``, timed by torch.utils.benchmark (the threads torch uses
    now, CUDA synchronised around the run)."""
    timer = benchmark.Timer(stmt="fn(images)", globals={"fn": fn, "images": images},
                            num_threads=torch.get_num_threads())
    return 1000.0 * timer.timeit(1).median


@torch.no_grad()
def latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn`` on the batch ``images`` (after one warm-up run)."""
    fn(images)
    return statistics.median(_timed(fn, images) for _ in range(repeats))


@torch.no_grad()
def latency_side_by_side(fns: list[Callable[[torch.Tensor], torch.Tensor]], images: torch.Tensor,
                         repeats: int = 5, warmup: int = 1) -> tuple[list[float], float]:
    """The median milliseconds of each of ``fns`` on ``images``, and the median over rounds of the ratio of the
    first's time to the sum of the others' (a target against its source models). Each round runs every function
    once, in turn, so that a burst of other work on the machine slows both sides of a ratio alike; ``warmup``
    untimed runs of each come first."""
    for _ in range(warmup):
        for fn in fns:
            fn(images)
    rounds = [[_timed(fn, images) for fn in fns] for _ in range(repeats)]
    medians = [statistics.median(r[i] for r in rounds) for i in range(len(fns))]
    return medians, statistics.median(r[0] / sum(r[1:]) for r in rounds)


def _model_fn(source) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: source(source.prepare(images))


COMPILED_WARMUP = 3  # untimed runs of a compiled function: the first compiles, CUDA graphs are recorded after


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` under ``torch.compile`` for one input shape: on CUDA in mode "reduce-overhead", which replays the
    whole pass as one CUDA graph instead of launching every kernel from Python (small batches of small images are
    launch-bound); elsewhere inductor's default, whose fused kernels save the passes over memory between layers.
    The first call compiles (seconds for a ResNet-20 on two CPU cores, more the first time in a process): time it
    after :data:`COMPILED_WARMUP` calls."""
    return torch.compile(fn, mode="reduce-overhead" if device_type == "cuda" else None, dynamic=False)


def cost_report(target, images: torch.Tensor, repeats: int = 5, source=None, compile: bool = False) -> dict:
    """Parameters, FLOPs per image and latency of ``target`` (a :class:`~cnnmod.composition.base.Composer`: uint8
    images in, scores out) on the batch ``images`` (uint8), with fractions of its source models' (the sum of
    those it holds and those given as ``source``, one model or a list: slim networks hold none). The latencies
    are measured side by side (:func:`latency_side_by_side`): ``latency_fraction`` is the median of the rounds'
    ratios. With ``compile``, the target and every source model are timed compiled (:func:`compiled`), each
    against the other as they would both be deployed; the report then says so (``"compiled": True``). Compiling
    first resets ``torch.compile``'s caches (``torch.compiler.reset()``), for the whole process: functions compiled
    before compile again on their next call."""
    target = target.eval()
    sources = {id(s): s for s in target.sources}
    for s in [] if source is None else source if isinstance(source, list) else [source]:
        sources.setdefault(id(s), s)
    if not sources:
        raise ValueError("cost_report needs the source model of slim modules")
    model_params = sum(count_params(s) for s in sources.values())
    model_flops = sum(count_flops(_model_fn(s), images[:1]) for s in sources.values())
    params, flops = count_params(target), count_flops(target, images[:1])
    fns = [target] + [_model_fn(s) for s in sources.values()]
    if compile:
        torch.compiler.reset()  # compiled afresh: torch.compile's caches, shared by every pass of one code, are bounded
        fns = [compiled(fn, images.device.type) for fn in fns]
    times, latency_fraction = latency_side_by_side(fns, images, repeats, COMPILED_WARMUP if compile else 1)
    latency, model_latency = times[0], sum(times[1:])
    return {"params": params, "flops": flops, "latency_ms": round(latency, 3),
            "params_fraction": round(params / model_params, 4), "flops_fraction": round(flops / model_flops, 4),
            "latency_fraction": round(latency_fraction, 4), "latency_batch": int(images.shape[0]),
            "model_params": model_params, "model_flops": model_flops, "model_latency_ms": round(model_latency, 3),
            **({"compiled": True} if compile else {})}
