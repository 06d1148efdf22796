"""Whether two versions of cnnmod give the same results: for a refactoring that must change nothing.

    python benchmarks/same_results.py modules OLD_SRC NEW_SRC [--model DIR] [--work DIR]
    python benchmarks/same_results.py study OLD/results.json NEW/results.json

``modules``: with the package under each ``src`` folder (a ``git worktree`` of the old commit, say), the slim
recipes ``cheap`` and ``small`` on every class of one model and a merged pair of the cheap modules pruned further,
each through the command line; then, module by module, whether the kept channels and the weights are the same, and
the composed top-1 of each. Without ``--model``, a ResNet-20 of width 8 is trained for 2 epochs on 6,000
Fashion-MNIST images first (with the old code). ``study``: the figures of two ``cnnmod reproduce`` runs, timings,
energy and CO2e aside, every difference listed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

RECIPES = ("cheap", "small")
PAIR = ("c00-t-shirt-top", "c03-dress")


def cli(src: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "CNNMOD_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "cnnmod", *args, "--json"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def make(src: Path, model: Path, work: Path, tag: str) -> dict:
    """The recipes' decompositions, the merged pair and their evaluations with the code under ``src``."""
    top1 = {}
    for recipe in RECIPES:
        out = work / f"{tag}-{recipe}"
        cli(src, "decompose", str(model), "--out", str(out), "--granularity", "channel", "--recipe", recipe,
            "--overwrite")
        top1[recipe] = cli(src, "evaluate", str(out), "--no-cost")["composed_top1"]
    pair = [str(work / f"{tag}-cheap" / "modules" / m) for m in PAIR]
    cli(src, "compose", *pair, "--mode", "merged", "--size", "0.2", "--out", str(work / f"{tag}-merged"), "--overwrite")
    top1["merged"] = cli(src, "evaluate", str(work / f"{tag}-merged"), "--no-cost")["composed_top1"]
    return top1


def same_weights(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two module or composition folders record the same removed channels, and their largest weight
    difference."""
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) if set(wa) == set(wb) else float("inf")
    return ca["removed"] == cb["removed"], diff


def modules(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "model"
    if not model.exists():
        cli(Path(args.old), "train", "--arch", "resnet20", "--arch-arg", "width=8", "--data", "fashion-mnist",
            "--epochs", "2", "--subset", "6000", "--out", str(model))
    old, new = make(Path(args.old), model, work, "old"), make(Path(args.new), model, work, "new")
    for recipe in RECIPES:
        rows = [same_weights(m, work / f"new-{recipe}" / "modules" / m.name)
                for m in sorted((work / f"old-{recipe}" / "modules").iterdir())]
        print(f"{recipe}: {sum(s for s, _ in rows)} of {len(rows)} modules keep the same channels, largest weight "
              f"difference {max(d for _, d in rows):.3g}; composed top-1 {old[recipe]} -> {new[recipe]}")
    same, diff = same_weights(work / "old-merged", work / "new-merged")
    print(f"merged pair: same channels {same}, largest weight difference {diff:.3g}; top-1 {old['merged']} -> "
          f"{new['merged']}")


SKIP = re.compile(r"second|kwh|co2|energy|latency|power|tracker|carbon|measured|_ms$|command|wall|to_training", re.I)


def differences(a, b, path: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if not SKIP.search(str(k)):
                out += differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def study(args) -> None:
    found = differences(json.loads(Path(args.old).read_text()), json.loads(Path(args.new).read_text()))
    print(f"{len(found)} differences (timings, energy and CO2e aside)")
    for path, a, b in found:
        print(f"{path}: {a} -> {b}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("modules")
    m.add_argument("old")
    m.add_argument("new")
    m.add_argument("--model")
    m.add_argument("--work", default="benchmarks/out/same_results")
    s = sub.add_parser("study")
    s.add_argument("old")
    s.add_argument("new")
    args = p.parse_args(argv)
    (modules if args.what == "modules" else study)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
