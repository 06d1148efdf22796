"""Slim modules against the paper's (issue: beyond the paper), built from library calls.

    python benchmarks/slim_and_fast.py runs/bench/resnet20-bn --sizes 0.5,0.25 --rules taylor,fisher,activation
    python benchmarks/slim_and_fast.py runs/bench/resnet20-bn --sizes 0.35,0.25 --costs params,both --pair-only
    python benchmarks/slim_and_fast.py runs/bench/resnet20-bn --sizes 0.5 --costs both --pair-only --pair 0,6 \
        --random-pairs 6 --merge-sizes 0.3,0.2 --multiple 8
    python benchmarks/slim_and_fast.py runs/bench/resnet20-bn --sizes 1.0 --costs both --pair-only --pair 0,6 \
        --merge-sizes 0.3 --merge-rules taylor,fisher --merge-max-loss 1 --multiple 8
    python benchmarks/slim_and_fast.py runs/bench/resnet20-bn --sizes 0.5 --device cuda --repeats 50 --name-suffix _cuda

For each size and importance rule: slim modules of all classes; their mean parameter fraction; the composed
top-1/top-5 against the model on the full test set; and, measured side by side in the same run, the latency
at batch 256 of the model, of the paper's voting composition (node-level modules, one batched pass) and of
the slim composition. ``--costs`` compares channel costs (params, flops, both: ``SlimSettings.cost``);
``--pair-only`` makes only the pairs' modules and measures only their 2-class merged compositions (``--pair``
repeats; ``--random-pairs N`` adds N pairs drawn with ``--seed``; ``--merge-rules taylor,fisher`` prunes the merged
pair to ``--merge-sizes`` with each rule; ``--sizes 1.0`` merges the whole model). Figures go to
benchmarks/out/slim_<model><suffix>.json (``slim_pair_<model><suffix>.json`` with ``--pair-only``) with a
markdown table. ``--device cuda`` builds, evaluates and times everything on the GPU (latency with CUDA
synchronisation around each pass; ``--repeats`` rounds, median). ``--retime --compile`` times the saved merged pairs
again, eager and then each pair and its model under ``torch.compile`` (on a GPU as CUDA graphs), side by side.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import importances  # noqa: F401 -- registers the benchmarks' importance and cost
from common import OUT, record

from cnnmod.composition.evaluate import evaluate_against_model
from cnnmod.composition.voting import compose
from cnnmod.core.cost import cost_report
from cnnmod.data import load
from cnnmod.models.folder import load_model
from cnnmod.node.method import DecomposeSettings, decompose
from cnnmod.runtime import Passes, pick_device
from cnnmod.slim import SlimSettings, merge_slim, slim_modules
from cnnmod.slim.artifact import load_merged_slim, save_merged_slim


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--sizes", default="0.75,0.5,0.35,0.25")
    p.add_argument("--rules", default="taylor")
    p.add_argument("--samples", type=int, default=SlimSettings.samples)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair", action="append", help="the two classes of a 2-class merged composition (repeatable; "
                   "default 0,6)")
    p.add_argument("--random-pairs", type=int, default=0, help="also this many pairs drawn with --seed")
    p.add_argument("--costs", default="params", help="channel costs to rank by (SlimSettings.cost), comma-separated")
    p.add_argument("--pair-only", action="store_true", help="only the pair's modules and 2-class composition")
    p.add_argument("--merge-sizes", default="", help="also prune the pair's merged composition to these sizes")
    p.add_argument("--merge-max-loss", default="",
                   help="also prune it as far as it loses at most this many points of held-out top-1 "
                        "(comma-separated: one composition each)")
    p.add_argument("--merge-rules", default="taylor", help="importance rules the merged composition is pruned to "
                   "--merge-sizes with (SlimSettings.rule), comma-separated; --merge-max-loss prunes with taylor")
    p.add_argument("--merge-reconstruct", action="store_true", help="the pair's merged composition, once pruned, has "
                   "its kept weights refitted to the model's features (SlimSettings.reconstruct)")
    p.add_argument("--merge-scale-epochs", type=int, default=0, help="the pair's merged composition, once pruned, "
                   "learns a scale per kept channel for this many epochs (SlimSettings.scale_epochs)")
    p.add_argument("--merge-scale-bn", action="store_true", help="with --merge-scale-epochs: BatchNorm's scales and "
                   "shifts too (SlimSettings.scale_bn)")
    p.add_argument("--multiple", type=int, default=1, help="keep channel counts a multiple of this (SlimSettings)")
    p.add_argument("--no-node", action="store_true", help="leave out the paper's node-level modules (measured before)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: where modules are made, evaluated and timed")
    p.add_argument("--repeats", type=int, default=5, help="latency rounds (side by side; the median is kept)")
    p.add_argument("--name-suffix", default="", help="appended to the output file's name (e.g. _cuda)")
    p.add_argument("--retime", action="store_true", help="with --pair-only: measure again the latency of the merged "
                   "pairs that the last run with these settings saved (on a quiet machine, or at a higher priority "
                   "than the other work on it), and rewrite its figures")
    p.add_argument("--compile", action="store_true", help="with --retime: also time each merged pair and its model "
                   "both under torch.compile (CUDA graphs on a GPU), side by side, beside the eager figures")
    args = p.parse_args(argv)
    if args.retime:
        return retime(args)
    device = pick_device(args.device)
    clf = load_model(args.model, device)
    train, test = load(clf.dataset, "train"), load(clf.dataset, "test")
    images = test.images[:256].to(device)
    pairs = [[int(v) for v in text.split(",")] for text in (args.pair or ["0,6"])]
    drawn = [list(q) for q in itertools.combinations(range(clf.num_classes), 2) if list(q) not in pairs]
    pairs += sorted(random.Random(args.seed).sample(drawn, args.random_pairs))
    rows = [] if args.pair_only or args.no_node else [node_row(clf, train, test, images, device, args.repeats)]
    for rule in args.rules.split(","):
        for cost in args.costs.split(","):
            for size in (float(v) for v in args.sizes.split(",")):
                t0 = time.perf_counter()
                s = SlimSettings(size=size, rule=rule, samples=args.samples, seed=args.seed, cost=cost,
                                 multiple=args.multiple)
                classes = sorted({c for q in pairs for c in q}) if args.pair_only else list(range(clf.num_classes))
                modules = dict(zip(classes, slim_modules(clf, train, classes, s), strict=True))
                row = {"kind": "slim (channel)", "size": size, "rule": rule, "cost": cost, "multiple": args.multiple,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "params_fraction": sum(m.metrics["params_fraction"] for m in modules.values()) / len(modules)}
                if not args.pair_only:
                    row.update(all_classes(clf, train, test, images, device, list(modules.values()), args))
                for pair in pairs if args.pair_only else pairs[:1]:
                    rows += pair_rows(clf, train, test.subset(pair), images, device, row, modules, pair, args)
    table = pair_table(rows) if args.pair_only else full_table(rows)
    command = (f"python benchmarks/slim_and_fast.py {args.model} --sizes {args.sizes} --rules {args.rules} "
               f"--costs {args.costs} --samples {args.samples}"
               + "".join(f" --pair {text}" for text in args.pair or [])
               + (f" --random-pairs {args.random_pairs} --seed {args.seed}" if args.random_pairs else "")
               + (" --pair-only" if args.pair_only else "")
               + (f" --merge-sizes {args.merge_sizes}" if args.merge_sizes else "")
               + (f" --merge-max-loss {args.merge_max_loss}" if args.merge_max_loss else "")
               + (f" --merge-rules {args.merge_rules}" if args.merge_rules != "taylor" else "")
               + (" --merge-reconstruct" if args.merge_reconstruct else "")
               + (f" --merge-scale-epochs {args.merge_scale_epochs}" if args.merge_scale_epochs else "")
               + (" --merge-scale-bn" if args.merge_scale_bn else "")
               + (" --no-node" if args.no_node else "") + (f" --multiple {args.multiple}" if args.multiple > 1 else "")
               + (f" --device {args.device} --repeats {args.repeats}" if device.type != "cpu" else "")
               + (f" --name-suffix {args.name_suffix}" if args.name_suffix else ""))
    if args.pair_only:
        summary = pair_summary(args.model.name, pairs, rows)
        name = f"slim_pair_{args.model.name}{args.name_suffix}"
    else:
        within = [r for r in rows if r["kind"] != "node (the paper's, mc-bln)" and r["cost_top1_pp"] >= -1.0]
        best = min(within, key=lambda r: r["params_fraction"], default=None)
        summary = (f"{args.model.name}: model {rows[0]['model_top1']:.2f}%; " + (
            f"smallest slim within 1 pp: {100 * best['params_fraction']:.1f}% of parameters, cost "
            f"{best['cost_top1_pp']:+.2f} pp" if best else "no slim setting within 1 pp"))
        name = f"slim_{args.model.name}{args.name_suffix}"
    path = record(name, command, {"rows": rows, "table": table}, summary)
    print(table)
    print(f"wrote {path}")


def pair_rows(clf, train, pair_test, images, device, row: dict, modules: dict, pair: list[int], args) -> list[dict]:
    """The pair's merged composition, as merged, pruned further to each of ``--merge-sizes``, and as far as
    ``--merge-max-loss`` allows."""
    rows = []
    prunings = [(None, None, "taylor")] + [(float(v), None, rule) for v in args.merge_sizes.split(",") if v
                                           for rule in args.merge_rules.split(",")]
    prunings += [(None, float(v), "taylor") for v in args.merge_max_loss.split(",") if v]
    for merge_size, max_loss, merge_rule in prunings:
        two = merge_slim([modules[c] for c in pair], clf, train,
                         SlimSettings(samples=args.samples, seed=args.seed, size=merge_size, cost=row["cost"],
                                      multiple=args.multiple, max_loss=max_loss, rule=merge_rule,
                                      reconstruct=args.merge_reconstruct, scale_epochs=args.merge_scale_epochs,
                                      scale_bn=args.merge_scale_bn))
        two_report = evaluate_against_model(two, clf, pair_test, device)
        two_cost = cost_report(two, images, args.repeats, source=clf)
        label = "union" if merge_size is None and max_loss is None else (
            f"size{merge_size:g}" + ("" if merge_rule == "taylor" else f"-{merge_rule}") if max_loss is None
            else f"max-loss{max_loss:g}")
        saved = (OUT / "pairs" / f"{args.model.name}{args.name_suffix}"
                 / f"{pair[0]}-{pair[1]}-{row['cost']}-m{args.multiple}-{label}")
        save_merged_slim(two, clf, saved, overwrite=True)
        rows.append({**row, "merge_size": merge_size, "merge_max_loss": max_loss, "merge_rule": merge_rule,
                     "merge_reconstruct": args.merge_reconstruct, "merge_scale_epochs": args.merge_scale_epochs,
                     "merge_scale_bn": args.merge_scale_bn, "pair": pair, "saved": str(saved),
                     "held_out_top1": two.metrics.get("held_out_top1"),
                     "held_out_model_top1": two.metrics.get("held_out_model_top1"),
                     "held_out_from": two.metrics.get("held_out_from"),
                     "pair_model_top1": two_report["model_top1"],
                     "pair_merged_top1": two_report["composed_top1"],
                     "pair_merged_latency_fraction": two_cost["latency_fraction"],
                     "pair_merged_flops_fraction": two_cost["flops_fraction"],
                     "pair_merged_params_fraction": two_cost["params_fraction"]})
        print(rows[-1], flush=True)
    return rows


def pair_summary(name: str, pairs: list[list[int]], rows: list[dict]) -> str:
    """Per pair, the fastest merged composition within 1 pp of the model restricted to it (else the fastest)."""
    parts, met = [], 0
    for pair in pairs:
        mine = [r for r in rows if r["pair"] == pair]
        within = [r for r in mine if r["pair_merged_top1"] >= r["pair_model_top1"] - 1.0]
        best = min(within or mine, key=lambda r: r["pair_merged_latency_fraction"])
        met += bool(within) and best["pair_merged_latency_fraction"] <= 0.5
        parts.append(f"{pair}: {best['pair_merged_top1']:.2f}% (model {best['pair_model_top1']:.2f}) at "
                     f"{best['pair_merged_latency_fraction']:.2f}x latency, pruned to {pruned_to(best)}"
                     f"{'' if within else ' (none within 1 pp)'}")
    return f"{name}: {met} of {len(pairs)} pairs within 1 pp at <= 0.5x latency; " + "; ".join(parts)


def node_row(clf, train, test, images, device, repeats: int) -> dict:
    """The paper's modules (node level, mc-bln): voting and merged compositions of all classes."""
    node = decompose(clf, train, settings=DecomposeSettings(calibration_samples=0),
                     passes=Passes(device, progress=False))
    node_report = evaluate_against_model(compose(node), clf, test, device)
    node_cost = cost_report(compose(node), images, repeats)
    merged_node = evaluate_against_model(compose(node, mode="merged"), clf, test, device)
    merged_node_cost = cost_report(compose(node, mode="merged"), images, repeats)
    row = {"kind": "node (the paper's, mc-bln)", "size": 1.0, "rule": "-", "cost": "-", "seconds": None,
           "params_fraction": cost_report(compose(node[:1]), images)["params_fraction"],
           "model_top1": node_report["model_top1"],
           "composed_top1": node_report["composed_top1"], "composed_top5": node_report["composed_top5"],
           "cost_top1_pp": node_report["top1_change_pp"],
           "composition_latency_fraction": node_cost["latency_fraction"],
           "composition_flops_fraction": node_cost["flops_fraction"],
           "merged_top1": merged_node["composed_top1"],
           "merged_latency_fraction": merged_node_cost["latency_fraction"],
           "merged_params_fraction": merged_node_cost["params_fraction"]}
    print(row, flush=True)
    return row


def all_classes(clf, train, test, images, device, modules: list, args) -> dict:
    """Slim modules of every class: their voting composition and their merged one."""
    report = evaluate_against_model(compose(modules), clf, test, device)
    cost = cost_report(compose(modules), images, args.repeats, source=clf)
    merged = merge_slim(modules, clf, train, SlimSettings(samples=args.samples, seed=args.seed))
    merged_report = evaluate_against_model(merged, clf, test, device)
    merged_cost = cost_report(merged, images, args.repeats, source=clf)
    return {"model_top1": report["model_top1"], "composed_top1": report["composed_top1"],
            "composed_top5": report["composed_top5"], "cost_top1_pp": report["top1_change_pp"],
            "composition_latency_fraction": cost["latency_fraction"],
            "composition_flops_fraction": cost["flops_fraction"],
            "merged_top1": merged_report["composed_top1"],
            "merged_latency_fraction": merged_cost["latency_fraction"],
            "merged_params_fraction": merged_cost["params_fraction"]}


def full_table(rows: list[dict]) -> str:
    lines = ["| modules | size | rule / cost | mean params (of model) | voting composition: top-1 / top-5, cost (pp), "
             "latency / FLOPs (x model) | merged 10-class: top-1, params, latency (x model) | merged 2-class: top-1 "
             "(model), params, latency | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pair_cell = (f"{r['pair_merged_top1']:.2f} ({r['pair_model_top1']:.2f}), "
                     f"{r['pair_merged_params_fraction']:.2f}, {r['pair_merged_latency_fraction']:.2f}"
                     if "pair" in r else "-")
        lines.append(f"| {r['kind']} | {r['size']} | {r['rule']} / {r['cost']} | {100 * r['params_fraction']:.1f}% | "
                     f"{r['composed_top1']:.2f} / {r['composed_top5']:.2f}, {r['cost_top1_pp']:+.2f}, "
                     f"{r['composition_latency_fraction']:.2f} / {r['composition_flops_fraction']:.2f} | "
                     f"{r['merged_top1']:.2f}, {r['merged_params_fraction']:.2f}, {r['merged_latency_fraction']:.2f} | "
                     f"{pair_cell} | {r['seconds'] if r['seconds'] is not None else '-'} |")
    return "\n".join(lines)


def retime(args) -> None:
    """The saved merged pairs of ``benchmarks/out/slim_pair_<model>.json``, timed again side by side with their
    source model; every figure but the latencies stays as that run measured it."""
    import json

    path = OUT / f"slim_pair_{args.model.name}{args.name_suffix}.json"
    payload = json.loads(path.read_text())
    rows = payload["figures"]["rows"]
    device = pick_device(args.device)
    images = load(load_model(args.model).dataset, "test").images[:256].to(device)
    for r in rows:
        merged, source = load_merged_slim(r["saved"], device)
        r["pair_merged_latency_fraction"] = cost_report(merged, images, args.repeats, source=source)["latency_fraction"]
        if args.compile:
            compiled = cost_report(merged, images, args.repeats, source=source, compile=True)
            r["pair_merged_latency_fraction_compiled"] = compiled["latency_fraction"]
            r["pair_merged_latency_ms_compiled"] = compiled["latency_ms"]
            r["model_latency_ms_compiled"] = compiled["model_latency_ms"]
        print(r["pair"], pruned_to(r), r["pair_merged_latency_fraction"],
              r.get("pair_merged_latency_fraction_compiled", ""), flush=True)
    pairs = [list(q) for q in dict.fromkeys(tuple(r["pair"]) for r in rows)]
    table = pair_table(rows)
    made_by = payload["command"].split("  # latencies:")[0]  # as first made, whatever retimed it since
    record(path.stem, made_by + "  # latencies: --retime" + (" --compile" if args.compile else ""),
           {"rows": rows, "table": table},
           pair_summary(args.model.name, pairs, rows))
    print(table)


def pruned_to(r: dict) -> str:
    if r.get("merge_max_loss") is not None:
        return f"max-loss {r['merge_max_loss']:g} ({r['pair_merged_params_fraction']:.2f})"
    rule = r.get("merge_rule", "taylor")
    return str(r["merge_size"] or "-") + ("" if rule == "taylor" or r["merge_size"] is None else f", {rule}")


def pair_table(rows: list[dict]) -> str:
    lines = ["| pair | modules' size | rule / cost | modules' mean params (of model) | merged, pruned to | merged "
             "2-class: top-1 (model restricted) | params / FLOPs / latency (x model) | seconds (modules) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair'][0]},{r['pair'][1]} | {r['size']} | {r['rule']} / {r['cost']} | "
                     f"{100 * r['params_fraction']:.1f}% | "
                     f"{pruned_to(r)} | "
                     f"{r['pair_merged_top1']:.2f} ({r['pair_model_top1']:.2f}) | "
                     f"{r['pair_merged_params_fraction']:.2f} / {r['pair_merged_flops_fraction']:.2f} / "
                     f"{r['pair_merged_latency_fraction']:.2f}"
                     + (f" (compiled: {r['pair_merged_latency_fraction_compiled']:.2f})"
                        if "pair_merged_latency_fraction_compiled" in r else "") + f" | {r['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
