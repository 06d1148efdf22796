"""The coverage matrix: every architecture family x every capability, with the composed accuracy after a short
training on Fashion-MNIST (docs/coverage.md).

Per family (:mod:`families`, by reference, as a user's own code is reached): train briefly, then
node-level decomposition (mc, mc-bln, mc-bi; ReLU families only) composed and measured against the model on the
test split; slim modules of every class composed by vote and merged into one network; a save + reload of the
decomposition (the reloaded composition must score bit for bit the same); an ONNX export of the mc-bln
composition (checked against PyTorch by the exporter). Every cell is a figure, "refused: <the one line>", or
"n/a" (node-level on non-ReLU networks, by the method's own rule).

    .venv/bin/python benchmarks/coverage.py [--families a,b] [--subset 6000] [--epochs 2] [--width 8]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # families.py
from common import ROOT, record  # noqa: E402
from families import FAMILIES, RELU_FAMILIES  # noqa: E402

import cnnmod  # noqa: E402
from cnnmod.composition.evaluate import evaluate_against_model  # noqa: E402
from cnnmod.data import load  # noqa: E402
from cnnmod.io.export import export_onnx  # noqa: E402
from cnnmod.jobs.train import train  # noqa: E402
from cnnmod.models.train import TrainSettings  # noqa: E402
from cnnmod.runtime import Passes  # noqa: E402
from cnnmod.slim import SlimSettings, merge_slim, slim_modules  # noqa: E402

CAPABILITIES = ["model", "mc", "mc-bln", "mc-bi", "slim", "merged", "save+reload", "onnx"]


def refusal(e: cnnmod.UserError) -> str:
    return "refused: " + str(e)[:90]


def run_family(name: str, args, work: Path) -> dict:
    device = torch.device("cpu")
    row: dict = {}
    started = time.perf_counter()
    settings = TrainSettings(arch=f"families:{name}", arch_args={"width": args.width},
                             data="fashion-mnist", subset=args.subset, epochs=args.epochs, optimizer="adam",
                             lr=0.003, batch_size=128, seed=0, device="cpu", augment=False)
    result = train(settings, work / "model", show_progress=False)
    clf = result["model"].eval()
    row["train_seconds"] = round(time.perf_counter() - started, 1)
    train_set = load("fashion-mnist", "train")
    test = load("fashion-mnist", "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.test]
    test = type(test)(test.name, test.split, test.images[idx], test.labels[idx], test.class_names, test.mean,
                      test.std)
    decompose_settings = cnnmod.DecomposeSettings(ci_samples=args.ci_samples, calibration_samples=0,
                                                  exact_only=args.exact_only)
    made = {}
    for variant in ("mc", "mc-bln", "mc-bi"):
        if name not in RELU_FAMILIES:
            row[variant] = "n/a (not ReLU: slim only)"
            continue
        try:
            made[variant] = cnnmod.decompose(clf, train_set, variant, settings=decompose_settings,
                                             passes=Passes(progress=False))
            report = evaluate_against_model(cnnmod.compose(made[variant]), clf, test, device)
            row["model"] = report["model_top1"]
            row[variant] = round(report["composed_top1"] - report["model_top1"], 2)
        except cnnmod.UserError as e:
            row[variant] = refusal(e)
    slim_settings = SlimSettings(size=args.size, samples=args.slim_samples, step=0.2)
    try:
        started = time.perf_counter()
        slims = slim_modules(clf, train_set, list(range(clf.num_classes)), slim_settings)
        report = evaluate_against_model(cnnmod.compose(slims), clf, test, device)
        row["model"] = report["model_top1"]
        row["slim"] = (f"{report['composed_top1'] - report['model_top1']:+.2f} at "
                       f"{100 * sum(m.kept_fraction() for m in slims) / len(slims):.0f}%")
        row["slim_seconds"] = round(time.perf_counter() - started, 1)
        merged = merge_slim(slims, clf, train_set, SlimSettings(samples=args.slim_samples, size=args.size),
                            held_per_class=50)
        report = evaluate_against_model(merged, clf, test, device)
        row["merged"] = (f"{report['composed_top1'] - report['model_top1']:+.2f} at "
                         f"{100 * merged.params() / clf.params():.0f}%")
    except cnnmod.UserError as e:
        row["slim"] = row["merged"] = refusal(e)
    modules = made.get("mc-bln") or (slims if "slim" in row and not str(row["slim"]).startswith("refused") else None)
    if modules:
        try:
            cnnmod.save_decomposition(modules, work / "dec", source=clf)
            loaded = cnnmod.load_modules(work / "dec")
            x = test.images[:16]
            same = torch.equal(cnnmod.compose(loaded)(x), cnnmod.compose(modules)(x))
            row["save+reload"] = "identical" if same else "DIFFERENT"
            folders = sorted(str(p) for p in (work / "dec" / "modules").iterdir())
            gap = export_onnx(folders, work / "c.onnx").get("max_abs_difference")
            row["onnx"] = f"ok (max diff {gap:.1e})" if isinstance(gap, float) else "ok"
        except cnnmod.UserError as e:
            row.setdefault("save+reload", refusal(e))
            row["onnx"] = refusal(e)
        except Exception as e:  # noqa: BLE001 - the matrix records what breaks, to be fixed
            row["onnx"] = f"error: {type(e).__name__}: {str(e)[:60]}"
    return row


def table(rows: dict[str, dict]) -> str:
    lines = ["| family | model top-1 | mc | mc-bln | mc-bi | slim (voting) | merged slim | save + reload | ONNX |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = [f"{r['model']:.2f}" if isinstance(r.get("model"), float) else "-"]
        for key in ("mc", "mc-bln", "mc-bi"):
            v = r.get(key, "-")
            cells.append(f"{v:+.2f}" if isinstance(v, float) else str(v))
        cells += [str(r.get(k, "-")) for k in ("slim", "merged", "save+reload", "onnx")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--subset", type=int, default=6000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--test", type=int, default=2000, help="test images")
    parser.add_argument("--ci-samples", type=int, default=200)
    parser.add_argument("--slim-samples", type=int, default=100)
    parser.add_argument("--size", type=float, default=0.5)
    parser.add_argument("--exact-only", action="store_true", help="decompose with --exact-only")
    parser.add_argument("--no-doc", action="store_true", help="do not write the table into docs/coverage.md")
    args = parser.parse_args()
    rows = {}
    with cnnmod.trusting(True):  # the families are this repository's code, reached by reference
        for name in args.families.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                rows[name] = run_family(name, args, Path(tmp))
                rows[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, rows[name], flush=True)
    text = table(rows)
    print(text)
    doc = ROOT / "docs" / "coverage.md"
    if doc.exists() and not args.no_doc:
        body = doc.read_text()
        new = re.sub(r"(<!-- coverage:begin -->\n).*?(\n<!-- coverage:end -->)",
                     lambda m: m.group(1) + text + m.group(2), body, flags=re.S)
        doc.write_text(new)
    command = "python benchmarks/coverage.py " + " ".join(sys.argv[1:])
    record("coverage-exact-only" if args.exact_only else "coverage", command.strip(), rows,
           f"{len(rows)} families x {len(CAPABILITIES)} capabilities")


if __name__ == "__main__":
    main()
