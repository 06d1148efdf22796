"""Composing modules of two models of two data sets, pair by pair, under every score calibration.

    python benchmarks/cross_calibration.py DECOMPOSITION_A DECOMPOSITION_B [--per-class 200] [--name NAME]

Every module of A is composed with every module of B (node-level or slim, any mix); each pair is evaluated on
its two classes' test images (at most --per-class of each, as the study does) with the paper's scores
("none") and each calibration the modules carry (temperature, platt, platt-ood). Decompose with
--calibration-samples N > 0 (the default) so that they carry them. For two slim decompositions, also "fused":
each pair as a fused slim composition (`compose --mode fused`: one merged network per model, each fitted
against the other model's class too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import record

from cnnmod.composition.build import Sources, build
from cnnmod.composition.evaluate import evaluate_composition
from cnnmod.composition.voting import compose
from cnnmod.core.calibrate import MODES
from cnnmod.io.store import load_modules, load_source_of


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--name", default=None, help="Benchmark name (default: from the two folders).")
    args = p.parse_args(argv)
    first, second = load_modules(args.a), load_modules(args.b)
    slim = all(m.granularity == "channel" for m in first + second)
    sources = (load_source_of(args.a), load_source_of(args.b)) if slim else None
    modes = list(MODES) + (["fused"] if slim else [])
    rows = []
    for a in first:
        for b in second:
            row = {"classes": [a.ref.qualified, b.ref.qualified],
                   "params_fraction": [round(m.kept_fraction(), 4) for m in (a, b)]}
            for mode in MODES:
                r = evaluate_composition(compose([a, b], calibration=mode), None, torch.device("cpu"),
                                         per_class=args.per_class)
                row[mode] = r["composed_top1"]
            if slim:
                fused = build([a, b], "fused", "none", Sources({s.info['weights_sha256']: s for s in sources}))
                r = evaluate_composition(fused, None, torch.device("cpu"), per_class=args.per_class)
                row["fused"] = r["composed_top1"]
            rows.append(row)
            print(row, flush=True)
    mean = {mode: round(sum(r[mode] for r in rows) / len(rows), 2) for mode in modes}
    table = "\n".join(["| pair | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
                      + [f"| {' + '.join(r['classes'])} | " + " | ".join(f"{r[m]:.2f}" for m in modes) + " |"
                         for r in rows]
                      + ["| **mean** | " + " | ".join(f"**{mean[m]:.2f}**" for m in modes) + " |"])
    name = args.name or f"cross_calibration_{args.a.name}_{args.b.name}"
    summary = f"{len(rows)} pairs, mean top-1: " + ", ".join(f"{m} {mean[m]:.2f}" for m in modes)
    path = record(name, f"python benchmarks/cross_calibration.py {args.a} {args.b} --per-class {args.per_class}",
                  {"rows": rows, "mean": mean, "table": table}, summary)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
