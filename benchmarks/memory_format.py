"""What channels_last would change on this machine, against the default (contiguous) layout, side by side in one
run: the model's own training step, and the passes a slim module's pruner makes on a module cut to a quarter of
the parameters (the scales' epoch, Fisher's per-input gradients, a features pass). Nothing in cnnmod uses
channels_last; this says whether it should, and how the ratios of "Slim modules' cost" would read against a
faster training.

    python benchmarks/memory_format.py runs/bench/resnet20-bn

Each figure is the least of ``--repeats`` timings after one warm-up, the two layouts alternated over ``--rounds``
rounds; the ratio is channels_last's seconds over contiguous's (under 1: channels_last is faster).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from common import record
from torch import nn

from cnnmod.data import load
from cnnmod.models.folder import load_model
from cnnmod.slim import ModuleMaker, SlimSettings
from cnnmod.slim.importance import Fisher
from cnnmod.slim.recovery import Scales

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def least(f, repeats: int) -> float:
    f()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def quarter_pruner(clf, train, concerned: int):
    """The pruner of one slim module of ``concerned`` cut to a quarter of the parameters (Fisher, its own budget,
    the refit), as the library leaves it after its last step and recoveries."""
    s = SlimSettings(size=0.25, rule="fisher", budget="module", step=0.5, step_samples=256, samples=1024,
                     reconstruct=True)
    maker = ModuleMaker(clf, train, concerned, s)
    maker.prune()
    return maker.pruner


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--concerned", type=int, default=6, help="the class whose module is timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name-suffix", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    clf = load_model(a.model)
    train = load(clf.info["training"]["data"], "train")
    p = quarter_pruner(clf, train, a.concerned)
    x = p.x_obs[:256].clone()
    y = torch.randint(0, clf.num_classes, (256,), generator=torch.Generator().manual_seed(0))
    net = copy.deepcopy(clf.net)  # trained a few steps here: the source stays as it is

    def layout(fmt) -> None:
        p.net.to(memory_format=fmt)
        p.x_obs = p.x_obs.contiguous(memory_format=fmt)
        net.to(memory_format=fmt)

    def training_steps() -> None:  # four steps of the model's training: forward, loss, backward, update
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        xb = x.contiguous(memory_format=torch.channels_last if x_last[0] else torch.contiguous_format)
        net.train()
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), y).backward()
            opt.step()
        net.eval()

    x_last = [False]  # whether the training step's inputs are in channels_last
    passes = {"the model's training step (4 x 256 images)": training_steps,
              "a quarter module: one epoch of scales and BatchNorm's affine over its observed inputs":
                  lambda: Scales(1, bn=True).learn(p),
              "a quarter module: Fisher's per-input gate gradients on a step's inputs": lambda: Fisher()(p),
              "a quarter module: features of all its observed inputs": lambda: p.features_of(p.x_obs)}
    x_last = [False]
    seconds: dict[str, dict[str, list[float]]] = {k: {n: [] for n in LAYOUTS} for k in passes}
    for _ in range(a.rounds):
        for name, fmt in LAYOUTS.items():
            layout(fmt)
            x_last[0] = name == "channels_last"
            for k, f in passes.items():
                seconds[k][name].append(round(least(f, a.repeats), 4))
    layout(torch.contiguous_format)
    rows = [{"pass": k, **{n: v[n] for n in LAYOUTS},
             "ratio": round(min(v["channels_last"]) / min(v["contiguous"]), 3)} for k, v in seconds.items()]
    for r in rows:
        print(r, flush=True)
    figures = {"model": a.model, "concerned": a.concerned, "kept_channels": p.kept_channels(),
               "inputs_observed": int(p.x_obs.shape[0]), "threads": torch.get_num_threads(), "rows": rows}
    summary = "; ".join(f"{r['pass']}: x{r['ratio']}" for r in rows)
    record(f"memory_format_{a.model.rstrip('/').split('/')[-1]}{a.name_suffix}",
           "python benchmarks/memory_format.py " + " ".join(argv), figures, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
