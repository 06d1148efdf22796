"""Training benchmarks (issue: foundation).

    python benchmarks/training.py accuracy     # ResNet-20 (BN), full Fashion-MNIST, 15 epochs: test top-1, s/epoch
    python benchmarks/training.py throughput   # cnnmod's loop vs a bare PyTorch loop over the same tensors
    python benchmarks/training.py loading      # reloading Fashion-MNIST from the decode cache

Figures go to benchmarks/out/*.json; the printed ledger line goes into docs/results/benchmarks-history.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from common import record

from cnnmod.data import load
from cnnmod.data.transforms import Augment, InputSpec, to_input
from cnnmod.jobs.train import train
from cnnmod.models import build
from cnnmod.models.train import TrainSettings, fit
from cnnmod.runtime import Distributed, seed_everything


def accuracy(args) -> None:
    s = TrainSettings(arch="resnet20", data="fashion-mnist", epochs=args.epochs, seed=args.seed, device=args.device)
    r = train(s, args.out, overwrite=True)
    figures = {k: r[k] for k in ("test_top1", "test_top5", "best_epoch", "seconds", "seconds_per_epoch",
                                 "images_per_second", "device")}
    figures["history"] = r["history"]
    record("train_resnet20_fashion_mnist", f"python benchmarks/training.py accuracy --epochs {args.epochs}", figures,
           f"test top-1 {r['test_top1']:.2f}% (best epoch {r['best_epoch']}), {r['seconds_per_epoch']:.1f} s/epoch, "
           f"{r['images_per_second']:.0f} img/s")


def bare_loop(model, images, labels, spec, batch_size, steps, lr) -> float:
    """The plainest loop over the same uint8 tensors: index, convert, forward, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    perm = torch.randperm(images.shape[0])
    t0 = time.perf_counter()
    for i in range(steps):
        idx = perm[(i * batch_size) % (images.shape[0] - batch_size):][:batch_size]
        x, y = to_input(images[idx], spec), labels[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def throughput(args) -> None:
    data = load("fashion-mnist", "train").take(torch.arange(args.images))
    spec = InputSpec(*data.input_shape, data.mean, data.std)
    steps = args.images // args.batch_size
    results = {"bare": [], "cnnmod": [], "cnnmod_augment": []}
    for rep in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
        for kind in results:
            seed_everything(rep)
            model = build("resnet20", spec.shape, 10)
            if kind == "bare":
                results[kind].append(bare_loop(model, data.images, data.labels, spec, args.batch_size, steps, 0.1))
            else:
                s = TrainSettings("resnet20", "fashion-mnist", epochs=1, batch_size=args.batch_size, val_split=0,
                                  augment=kind == "cnnmod_augment").resolved()
                r = fit(model, data, None, spec, s, Augment(2, True), torch.device("cpu"), Distributed(), False)
                results[kind].append(r["images_seen"] / r["train_seconds"])
    best = {k: max(v) for k, v in results.items()}
    figures = {"images_per_second": results, "best": best, "ratio_cnnmod_to_bare": best["cnnmod"] / best["bare"],
               "ratio_cnnmod_augment_to_bare": best["cnnmod_augment"] / best["bare"],
               "batch_size": args.batch_size, "images": args.images}
    record("train_loop_throughput", f"python benchmarks/training.py throughput --images {args.images}", figures,
           f"cnnmod loop {best['cnnmod']:.0f} img/s vs bare {best['bare']:.0f} img/s: ratio "
           f"{figures['ratio_cnnmod_to_bare']:.3f} (with augmentation {figures['ratio_cnnmod_augment_to_bare']:.3f})")


def loading(args) -> None:
    load("fashion-mnist", "train")  # make sure the cache exists
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        tr, te = load("fashion-mnist", "train"), load("fashion-mnist", "test")
        float(tr.images[-1].float().mean() + te.images[-1].float().mean())  # touch the data
        times.append(time.perf_counter() - t0)
    record("load_fashion_mnist_cached", "python benchmarks/training.py loading", {"seconds": times},
           f"reload of both splits from the cache: best {min(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["accuracy", "throughput", "loading"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/fm-r20")
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    {"accuracy": accuracy, "throughput": throughput, "loading": loading}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
