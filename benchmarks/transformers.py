"""Slim modules of a vision transformer or ConvNeXt of the zoo (issue: transformers and today's CNNs), with the
library's defaults, as ``cnnmod decompose --size S`` and ``cnnmod compose`` make them.

    python benchmarks/transformers.py runs/bench/vit-fm --sizes 0.75,0.5,0.35,0.25
    python benchmarks/transformers.py runs/bench/vit-fm --sizes 0.5 --pairs 0,3/0,6/2,3/3,5/3,7/4,7/4,8 --pair-size 0.3

For every size: the modules of all ten classes (timed), their mean share of the model's parameters; the voting
composition and the merged one (one network, the union of their heads, hidden units and channels) against the
model on the whole test set; the modules' seconds against the model's training on this machine, measured in the
same run (``slim_cost.training_estimate``: one epoch's images per second, scaled). With ``--pairs``: each pair's
merged composition of its two modules (made at the first size), pruned for the pair to ``--pair-size`` with the
merged defaults, against the model restricted to the pair on the pair's test images, and its latency against the
model's (batch 64, side by side). Figures go to benchmarks/out/transformers_<model><suffix>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from common import record
from slim_cost import training_estimate

import cnnmod
from cnnmod.composition.evaluate import evaluate_against_model
from cnnmod.core.attention import canonical
from cnnmod.core.cost import cost_report
from cnnmod.core.graph import ModelGraph
from cnnmod.data import load
from cnnmod.models.folder import load_model
from cnnmod.slim.config import slim_settings
from cnnmod.slim.make import slim_modules
from cnnmod.slim.units import find_units

CPU = torch.device("cpu")


def unit_shares(clf, modules: list) -> dict:
    """The share of the model's attention heads and of its MLP hidden units the modules keep, on average (Vulcan
    reports the MLP's units class-specific and attention class-agnostic: a module that keeps more heads than units
    agrees)."""
    net = canonical(copy.deepcopy(clf.net).eval(), None, clf.spec.shape)
    units = find_units(ModelGraph(net, clf.spec.shape))
    shares = {}
    for kind in ("heads", "hidden"):
        total = sum(u.channels for u in units.values() if u.kind == kind)
        if total:
            kept = [1 - sum(len(m.removed.get(r, [])) for r, u in units.items() if u.kind == kind) / total
                    for m in modules]
            shares[kind] = round(sum(kept) / len(kept), 4)
    return shares


def composed(composer, clf, test) -> dict:
    r = evaluate_against_model(composer, clf, test, CPU)
    return {"top1": r["composed_top1"], "model_top1": r["model_top1"], "cost_pp": r["top1_change_pp"]}


def pair_row(pair: list[int], modules: list, clf, train, test, size: float) -> dict:
    chosen = [modules[c] for c in pair]
    started = time.perf_counter()
    merged = cnnmod.compose(chosen, mode="merged", model=clf, data=train, size=size)
    seconds = time.perf_counter() - started
    restricted = test.subset(pair)
    r = composed(merged, clf, restricted)
    images = restricted.images[:64]
    cost = cost_report(merged, images, repeats=5, source=clf)
    return {"pair": pair, "names": [clf.class_names[c] for c in pair], **r, "seconds": round(seconds, 1),
            "params_fraction": cost["params_fraction"], "flops_fraction": cost["flops_fraction"],
            "latency_fraction": cost["latency_fraction"]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--sizes", default="0.75,0.5,0.35,0.25")
    p.add_argument("--pairs", default="", help="pairs of classes a,b/c,d/...")
    p.add_argument("--pair-size", type=float, default=0.3)
    p.add_argument("--no-merged", action="store_true", help="the voting composition only")
    p.add_argument("--train-images", type=int, default=3200)
    p.add_argument("--name-suffix", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    clf = load_model(args.model)
    train, test = load(clf.dataset, "train"), load(clf.dataset, "test")
    training = training_estimate(clf, args.train_images)
    print("training", training, flush=True)
    rows, pairs, first = [], [], None
    for size in (float(v) for v in args.sizes.split(",")):
        s = slim_settings(None, every_class=True, one_process=True, size=size)
        started = time.perf_counter()
        modules = slim_modules(clf, train, list(range(clf.num_classes)), s)
        seconds = time.perf_counter() - started
        first = first or modules
        row = {"size": size, "recipe": s.recipe, "seconds": round(seconds, 1),
               "to_training": round(seconds / training["estimated_seconds"], 4),
               "params_fraction": round(sum(m.kept_fraction() for m in modules) / len(modules), 4),
               "kept": unit_shares(clf, modules),
               "vote": composed(cnnmod.compose(modules, mode="vote"), clf, test)}
        if not args.no_merged:
            merged = cnnmod.compose(modules, mode="merged", model=clf, data=train)
            row["merged"] = {**composed(merged, clf, test), "params_fraction": merged.metrics["params_fraction"]}
        print(row, flush=True)
        rows.append(row)
    for text in filter(None, args.pairs.split("/")):
        pair = [int(v) for v in text.split(",")]
        pairs.append(pair_row(pair, first, clf, train, test, args.pair_size))
        print(pairs[-1], flush=True)
    table = ["| size | recipe | modules' parameters | voting top-1 (cost pp) | merged top-1 (cost pp) | merged "
             "parameters | seconds for ten | / training |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("merged") or {"top1": float("nan"), "cost_pp": float("nan"), "params_fraction": float("nan")}
        table.append(f"| {r['size']} | {r['recipe']} | {100 * r['params_fraction']:.1f} % | {r['vote']['top1']:.2f} "
                     f"({r['vote']['cost_pp']:+.2f}) | {m['top1']:.2f} ({m['cost_pp']:+.2f}) | "
                     f"{100 * m['params_fraction']:.1f} % | {r['seconds']} | {100 * r['to_training']:.1f} % |")
    if pairs:
        table += ["", "| pair | merged top-1 (model on the pair) | cost pp | parameters | FLOPs | latency |",
                  "|---|---|---|---|---|---|"]
        table += [f"| {' + '.join(r['names'])} | {r['top1']:.2f} ({r['model_top1']:.2f}) | {r['cost_pp']:+.2f} | "
                  f"{r['params_fraction']:.2f}x | {r['flops_fraction']:.2f}x | {r['latency_fraction']:.2f}x |"
                  for r in pairs]
    print("\n".join(table))
    summary = "; ".join(f"{r['size']}: vote {r['vote']['cost_pp']:+.2f}"
                        + (f", merged {r['merged']['cost_pp']:+.2f}" if "merged" in r else "")
                        + f" in {100 * r['to_training']:.1f} % of training" for r in rows)
    record(f"transformers_{args.model.name}{args.name_suffix}", "python benchmarks/transformers.py "
           + " ".join(argv), {"training": training, "sizes": rows, "pairs": pairs, "table": table}, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
