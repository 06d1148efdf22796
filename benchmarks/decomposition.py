"""The decomposition-cost study (issue: decompose), built from library calls.

    python benchmarks/decomposition.py cnn     # ResNet-20/32/56 without BatchNorm and ResNet-20 with it, 3 variants
    python benchmarks/decomposition.py dense   # the dense predecessor: MLPs of 1-4 hidden layers of 49 ReLU units

Each model is trained once (cached under runs/bench/ by its settings; a model folder already there is reused),
observed once, and decomposed with the three variants from that one observation pass. Every figure is measured
on the full Fashion-MNIST test set. Results go to benchmarks/out/decomposition_*.json with a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import ROOT, record

from cnnmod.composition.evaluate import evaluate_against_model
from cnnmod.composition.voting import compose
from cnnmod.core.graph import ModelGraph
from cnnmod.core.observe import Sampling, observe
from cnnmod.data import load
from cnnmod.jobs.train import train
from cnnmod.models.folder import load_model
from cnnmod.models.train import TrainSettings
from cnnmod.node.method import VARIANTS, Ablation, DecomposeSettings, decompose
from cnnmod.runtime import Passes

CNN_MODELS = {
    # name: (arch, arch args, epochs, subset, optimizer). BatchNorm-free ResNets train with Adam (lr 1e-3), as
    # the Keras ResNet example the paper used does; SGD at 0.1 kills them.
    "resnet20-bn": ("resnet20", {"bn": True}, 15, None, "sgd"),
    "resnet20": ("resnet20", {"bn": False}, 6, 20000, "adam"),
    "resnet32": ("resnet32", {"bn": False}, 6, 20000, "adam"),
    "resnet56": ("resnet56", {"bn": False}, 6, 20000, "adam"),
    # the paper's setting trained on all 54,000 training images until validation stops improving (issue 17)
    "resnet20-full": ("resnet20", {"bn": False}, 15, None, "adam"),
    "resnet32-full": ("resnet32", {"bn": False}, 15, None, "adam"),
    "resnet56-full": ("resnet56", {"bn": False}, 15, None, "adam"),
}
# cnnmod's documented switches (DecomposeSettings fields) and the paper's open readings (its Ablation's), each
# measured beside the paper's settings
SWITCHES = {"exact-only": {"exact_only": True}, "correct-only": {"correct_only": True},
            "tau-0.1": {"tau": 0.1}, "correct-only+exact-only": {"correct_only": True, "exact_only": True},
            "relative-delta": {"relative_delta": True}, "relative-delta-2": {"relative_delta": True, "delta": 2.0}}


def settings_with(switch: dict, condition: str, **fields) -> DecomposeSettings:
    """Settings with a switch of :data:`SWITCHES` on: its settings fields as they are, the paper's readings (and
    MC-BLN's ``condition``) as the ablation's."""
    readings = {k: v for k, v in switch.items() if k in Ablation.__dataclass_fields__}
    rest = {k: v for k, v in switch.items() if k not in readings}
    return DecomposeSettings(**fields, **rest, ablation=Ablation(condition=condition, **readings))


def model_for(name: str, arch: str, args: dict, epochs: int, subset: int | None, optimizer: str, augment: bool,
              seed: int, runs: Path) -> Path:
    out = runs / name
    if (out / "config.json").is_file():
        return out
    train(TrainSettings(arch=arch, data="fashion-mnist", arch_args=args, epochs=epochs, subset=subset,
                        optimizer=optimizer, augment=augment, seed=seed, device="auto"), out, overwrite=True)
    return out


def study(model_dir: Path, variants: tuple[str, ...], samples: int, seed: int, condition: str = "pseudocode",
          switches: tuple[str, ...] = (), switch_variants: tuple[str, ...] = ("mc-bln",)) -> list[dict]:
    clf = load_model(model_dir)
    train_set, test = load("fashion-mnist", "train"), load("fashion-mnist", "test")
    graph = ModelGraph(clf.net, clf.spec.shape)
    t0 = time.perf_counter()
    stats = observe(clf.net, graph, clf.prepare, train_set, Sampling(samples, seed), Passes("cpu"))
    observe_seconds = time.perf_counter() - t0
    training = clf.info.get("training", {})
    rows, passes = [], {(False, False): (stats, observe_seconds)}
    for variant, switch in [(v, None) for v in variants] + [(v, w) for w in switches for v in switch_variants]:
        s = settings_with(SWITCHES[switch] if switch else {}, condition, variant=variant, ci_samples=samples,
                          seed=seed, calibration_samples=0)
        # one observation pass per kind: --correct-only observes other inputs, --tau needs counts as well
        kind = (s.ablation.correct_only, s.ablation.tau > 0)
        if kind not in passes:
            t1 = time.perf_counter()
            passes[kind] = (observe(clf.net, graph, clf.prepare, train_set,
                                    Sampling(samples, seed, s.ablation.correct_only, s.ablation.tau > 0),
                                    Passes("cpu")),
                            time.perf_counter() - t1)
        t0 = time.perf_counter()
        modules = decompose(clf, train_set, settings=s, stats=passes[kind][0], passes=Passes(progress=False))
        seconds = passes[kind][1] + time.perf_counter() - t0
        report = evaluate_against_model(compose(modules), clf, test, torch.device("cpu"), 512)
        row = {"model": model_dir.name, "arch": clf.arch, "bn": clf.arch_args.get("bn", None),
               "variant": (variant if condition == "pseudocode" else f"{variant} ({condition})")
               + (f" --{switch}" if switch else ""), "switch": switch,
               "training_epochs": training.get("epochs"), "training_subset": training.get("subset"),
               "training_seconds": training.get("seconds"), "decomposition_seconds": round(seconds, 3),
               "observe_seconds": round(passes[kind][1], 3),
               "decomposition_to_training": round(seconds / training["seconds"], 5) if training.get("seconds")
               else None,
               **{k: v for k, v in report.items() if k != "per_class"}, "per_class": report["per_class"]}
        rows.append(row)
        print(f"{row['model']:12s} {variant:7s} model {row['model_top1']:.2f}/{row['model_top5']:.2f} composed "
              f"{row['composed_top1']:.2f}/{row['composed_top5']:.2f} cost {row['top1_change_pp']:+.2f}/"
              f"{row['top5_change_pp']:+.2f} jaccard {row['jaccard_model_mean']:.4f} "
              f"{seconds:.1f}s ({100 * (row['decomposition_to_training'] or 0):.2f}% of training)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | model top-1 / top-5 | composed top-1 / top-5 | cost top-1 / top-5 (pp) | Jaccard "
             "module-model / pairwise | decomposition s | % of training time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['decomposition_to_training']:.2f}%" if r["decomposition_to_training"] else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['model_top1']:.2f} / {r['model_top5']:.2f} | "
                     f"{r['composed_top1']:.2f} / {r['composed_top5']:.2f} | {r['top1_change_pp']:+.2f} / "
                     f"{r['top5_change_pp']:+.2f} | {r['jaccard_model_mean']:.4f} / "
                     f"{r['jaccard_pairwise_mean']:.4f} | {r['decomposition_seconds']:.1f} | {pct} |")
    return "\n".join(lines)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cnn(args) -> None:
    names = args.models.split(",")
    rows = []
    for name in names:
        arch, arch_args, epochs, subset, optimizer = CNN_MODELS[name]
        model_dir = model_for(name, arch, arch_args, args.epochs or epochs, subset, optimizer, True, args.seed,
                              args.runs)
        rows += study(model_dir, tuple(args.variants.split(",")), args.samples, args.seed, args.condition,
                      tuple(filter(None, args.switches.split(","))), tuple(args.switch_variants.split(",")))
    bln = [r for r in rows if r["variant"] == "mc-bln"]
    figures = {"rows": rows, "mean_cost_mc_bln_top1_pp": mean([r["top1_change_pp"] for r in bln]),
               "mean_cost_mc_bln_top5_pp": mean([r["top5_change_pp"] for r in bln]),
               "mean_jaccard_mc_bln": mean([r["jaccard_model_mean"] for r in bln]), "table": table(rows)}
    suffix = ("" if args.condition == "pseudocode" else f"_{args.condition}") + "_" + "_".join(names)
    path = record(f"decomposition_cnn{suffix}", f"python benchmarks/decomposition.py cnn --models {args.models} "
                  f"--variants {args.variants} --condition {args.condition}"
                  + (f" --switches {args.switches} --switch-variants {args.switch_variants}" if args.switches
                     else ""), figures,
                  f"MC-BLN mean cost {figures['mean_cost_mc_bln_top1_pp']:+.2f} pp top-1, "
                  f"{figures['mean_cost_mc_bln_top5_pp']:+.2f} pp top-5; mean Jaccard "
                  f"{figures['mean_jaccard_mc_bln']:.3f} over {len(bln)} models")
    print(figures["table"])
    print(f"wrote {path}")


def dense(args) -> None:
    rows = []
    for layers in range(1, 5):
        name = f"mlp-{layers}x49"
        model_dir = model_for(name, "mlp", {"hidden": [49] * layers}, args.epochs or 10, None, "adam", False,
                              args.seed, args.runs)
        rows += study(model_dir, tuple(args.variants.split(",")), args.samples, args.seed)
    figures = {"rows": rows, "table": table(rows),
               "max_abs_cost_top1_pp": max(abs(r["top1_change_pp"]) for r in rows)}
    path = record("decomposition_dense", "python benchmarks/decomposition.py dense", figures,
                  f"MLPs of 1-4 x 49 units: max |cost| {figures['max_abs_cost_top1_pp']:.2f} pp top-1 over "
                  f"{len(rows)} rows")
    print(figures["table"])
    print(f"wrote {path}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["cnn", "dense"])
    p.add_argument("--models", default=",".join(CNN_MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=None, help="override every model's training epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--condition", default="pseudocode", choices=["pseudocode", "prose"])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--switch-variants", default="mc-bln", help="the variants measured with each switch")
    p.add_argument("--switches", default="", help=f"also with these switches, comma-separated: {', '.join(SWITCHES)}")
    args = p.parse_args(argv)
    {"cnn": cnn, "dense": dense}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
