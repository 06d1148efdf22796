"""What slim modules cost to make, against what training the model cost, and what they keep (issue: slim modules
at a quarter of the model), built from library calls.

    python benchmarks/slim_cost.py runs/bench/resnet20-bn --sizes 0.75,0.5,0.35,0.25,0.15
    python benchmarks/slim_cost.py runs/bench/resnet20-bn --sizes 0.5 --configs old:step_samples=none,new
    python benchmarks/slim_cost.py runs/bench/resnet20-bn --profile --configs old:step_samples=none,new
    python benchmarks/slim_cost.py runs/bench/resnet20-bn --sizes 0.25 --configs "best:rule=fisher;..." --joint-heads 3

For every configuration (``NAME[:KEY=VALUE;KEY=VALUE]``, ``SlimSettings`` fields; ``none`` for None; ``rule`` may
name an importance a benchmark registers, such as ``activation`` from importances.py) and size:
the slim modules of every class, made one after the other in this process, timed; their mean share of the
model's parameters; the voting composition of all of them against the model on the whole test set; and the
seconds for the modules over the seconds the model's training took (recorded in its config.json, on this
machine). ``--joint-heads W,...``: for every configuration, also the same modules with their heads then refitted
together at each weight (the library's ``refit_heads_together``, as ``joint_heads=W`` runs it), side by side.
``--profile`` makes one module per configuration under cProfile instead and says where its time goes.
Figures go to benchmarks/out/slim_cost_<model><suffix>.json with a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import importances  # noqa: F401 -- registers the baselines' importances
import torch
from common import record

from cnnmod.composition.evaluate import evaluate_against_model
from cnnmod.composition.voting import compose
from cnnmod.data import load
from cnnmod.jobs.train import train
from cnnmod.models.folder import load_model
from cnnmod.models.train import TrainSettings
from cnnmod.slim import SlimSettings
from cnnmod.slim.make import refit_heads_together, slim_modules

# where a module's time goes: (label, function name as cProfile reports it, file it lives in); cumulative times,
# so a part that calls another counts it too
PARTS = [("importance (Taylor or Fisher: forward + backward)", "gate_gradients", "importance.py"),
         ("learning the scales after the last step (Scales.learn)", "learn", "recovery.py"),
         ("the kept weights refitted by least squares (refit_layers)", "refit_layers", "refit.py"),
         ("BatchNorm re-estimation", "reestimate_bn", "channels.py"),
         ("head refits (features + fit)", "refit", "pruner.py"),
         ("the source's probabilities", "source_log_odds", "calibrate.py"),
         ("slicing and checking", "sliced", "pruner.py"),
         ("copying the network, groups, costs", "frozen_copy", "channels.py"),
         ("narrowing the network to its open channels", "narrow", "pruner.py")]


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    kinds = {f.name: f.type for f in fields(SlimSettings)}
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown SlimSettings field {key!r}")
        kind = str(kinds[key])
        overrides[key] = None if value == "none" else value.lower() in ("1", "true", "yes") if kind == "bool" else (
            int(value) if "int" in kind else float(value) if "float" in kind else value)
    return name, overrides


def profile_one(clf, train, s: SlimSettings) -> dict:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    slim_modules(clf, train, [0], s)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats
    parts = {}
    for label, fn, file in PARTS:
        parts[label] = round(sum(v[3] for (f, _, name), v in stats.items() if name == fn and f.endswith(file)), 2)
    return {"seconds": round(total, 2), "parts": parts}


def training_estimate(clf, images: int) -> dict:
    """What training the model costs on this machine now: ``cnnmod train`` with the settings its config records,
    one epoch on ``images`` of its training images, its loop's images per second scaled to the model's epochs
    and training-set size (validation and testing left out: in training's favour)."""
    t = clf.info["training"]
    keys = {f.name for f in fields(TrainSettings)}
    s = TrainSettings(**{**{k: v for k, v in t.items() if k in keys}, "epochs": 1, "subset": images})
    with tempfile.TemporaryDirectory() as tmp:
        r = train(s, Path(tmp) / "m", overwrite=True)
    full = len(load(t["data"], "train"))
    trained_on = full - int(round(full * t.get("val_split", 0.1)))  # as split_indices splits it
    seconds = trained_on * t["epochs"] / r["images_per_second"]  # the loop alone: validation left out, in its favour
    return {"probe_images": images, "probe_seconds": r["seconds"], "images_per_second": r["images_per_second"],
            "estimated_seconds": round(seconds, 1), "recorded_seconds": t["seconds"]}


def measured(name: str, size: float, overrides: dict, modules: list, seconds: float, clf, test,
             training_seconds: float) -> dict:
    """One row: the modules' mean share of the parameters, their voting composition against the model on the
    test set, and their seconds against training's."""
    report = evaluate_against_model(compose(modules), clf, test, torch.device("cpu"))
    row = {"config": name, "size": size, **overrides,
           "params_fraction": round(sum(m.metrics["params_fraction"] for m in modules) / len(modules), 4),
           "max_params_fraction": max(m.metrics["params_fraction"] for m in modules),
           "model_top1": report["model_top1"], "composed_top1": report["composed_top1"],
           "cost_top1_pp": report["top1_change_pp"], "seconds": round(seconds, 1),
           "training_seconds": training_seconds,
           "to_training": round(seconds / training_seconds, 4),
           # where the cost sits: each class's share of the parameters, pruning steps, top-1 and binary
           # accuracy composed (the model's top-1 beside)
           "per_class": [{"class": m.concerned, "params_fraction": m.metrics["params_fraction"],
                          "steps": len(m.metrics["history"]) - 1, "model_top1": c["model_top1"],
                          "composed_top1": c["composed_top1"], "binary_accuracy": c["binary_accuracy"]}
                         for m, c in zip(modules, report["per_class"], strict=True)]}
    print({k: v for k, v in row.items() if k != "per_class"}, flush=True)
    for c in row["per_class"]:
        print("   ", c, flush=True)
    return row


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--sizes", default="0.5")
    p.add_argument("--configs", default="default", help="NAME[:KEY=VALUE;...] comma-separated")
    p.add_argument("--profile", action="store_true", help="one module per configuration, profiled")
    p.add_argument("--name-suffix", default="")
    p.add_argument("--joint-heads", default="",
                   help="weights W,...: each configuration's modules also with their heads refitted together at W")
    p.add_argument("--train-images", type=int, default=6400,
                   help="time training on this many images in the same run, to set the modules' time against")
    args = p.parse_args(argv)
    clf = load_model(args.model)
    train, test = load(clf.dataset, "train"), load(clf.dataset, "test")
    training = training_estimate(clf, args.train_images) if not args.profile else None
    training_seconds = training["estimated_seconds"] if training else None
    print("training", training, flush=True)
    configs = [parse_config(c) for c in args.configs.split(",")]
    rows = []
    for size in (float(v) for v in args.sizes.split(",")):
        for name, overrides in configs:
            s = replace(SlimSettings(size=size), **overrides)
            if args.profile:
                row = {"config": name, "size": size, **overrides, **profile_one(clf, train, s)}
                print(row, flush=True)
                rows.append(row)
                continue
            t0 = time.perf_counter()
            modules = slim_modules(clf, train, list(range(clf.num_classes)), s)
            seconds = time.perf_counter() - t0
            print(f"{name} size {size}: {len(modules)} modules in {seconds:.1f} s", flush=True)
            rows.append(measured(name, size, overrides, modules, seconds, clf, test, training_seconds))
            for weight in (float(v) for v in filter(None, args.joint_heads.split(","))):
                refitted = copy.deepcopy(modules)
                t0 = time.perf_counter()
                refit_heads_together(refitted, clf, train, replace(s, joint_heads=weight))
                extra = time.perf_counter() - t0
                print(f"  heads refitted together at {weight:g} in {extra:.1f} s", flush=True)
                rows.append(measured(f"{name}+joint{weight:g}", size, {**overrides, "joint_heads": weight}, refitted,
                                     seconds + extra, clf, test, training_seconds))
    if args.profile:
        table = ["| configuration | size | seconds (one module) | " + " | ".join(label for label, _, _ in PARTS) + " |",
                 "|---|---|---|" + "---|" * len(PARTS)]
        table += [f"| {r['config']} | {r['size']} | {r['seconds']} | " + " | ".join(
            str(r["parts"][label]) for label, _, _ in PARTS) + " |" for r in rows]
        summary = "; ".join(f"{r['config']} {r['seconds']} s per module" for r in rows)
    else:
        table = ["| configuration | size | mean params (max) | voting composition of all: top-1 (model), cost | "
                 "seconds for all modules | / training |", "|---|---|---|---|---|---|"]
        table += [f"| {r['config']} | {r['size']} | {100 * r['params_fraction']:.1f}% "
                  f"({100 * r['max_params_fraction']:.1f}%) | {r['composed_top1']:.2f} ({r['model_top1']:.2f}), "
                  f"{r['cost_top1_pp']:+.2f} | {r['seconds']} | "
                  f"{100 * r['to_training']:.1f}% |" for r in rows]
        summary = "; ".join(f"{r['config']} size {r['size']}: {100 * r['params_fraction']:.1f}% params, "
                            f"{r['cost_top1_pp']:+.2f} pp, {100 * r['to_training']:.1f}% of training" for r in rows)
    command = "python benchmarks/slim_cost.py " + " ".join(argv)
    path = record(f"slim_cost{'_profile' if args.profile else ''}_{args.model.name}{args.name_suffix}", command,
                  {"training": training, "rows": rows, "table": "\n".join(table)}, summary)
    print("\n".join(table))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
