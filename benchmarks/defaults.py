"""The node-level defaults side by side: the paper's setting against ``exact_only`` (switch nodes off only where
a ReLU follows), and voting (a pass per module) against merged (one pass) compositions of one model's modules,
on small models trained briefly on Fashion-MNIST.

    .venv/bin/python benchmarks/defaults.py [--epochs 3] [--subset 6000] [--test 3000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from cnnmod.composition.voting import compose  # noqa: E402
from cnnmod.core.metrics import predict_scores  # noqa: E402
from cnnmod.data import load  # noqa: E402
from cnnmod.jobs.train import train  # noqa: E402
from cnnmod.models.train import TrainSettings  # noqa: E402
from cnnmod.node import DecomposeSettings, decompose  # noqa: E402

MODELS = [("resnet20-w8", "resnet20", {"width": 8}), ("resnet20-w8-nobn", "resnet20", {"width": 8, "bn": False}),
          ("cnn", "cnn", {})]


def top1(score, prepare, images, labels) -> float:
    scores = predict_scores(score, prepare, images, torch.device("cpu"), 256)
    return 100.0 * float((scores.argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=6000)
    parser.add_argument("--test", type=int, default=3000)
    args = parser.parse_args()
    train_set, test = load("fashion-mnist", "train"), load("fashion-mnist", "test")
    images, labels = test.images[:args.test], test.labels[:args.test]
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for name, arch, arch_args in MODELS:
            s = TrainSettings(arch=arch, arch_args=arch_args, data="fashion-mnist", subset=args.subset,
                              epochs=args.epochs, optimizer="adam", lr=0.003, batch_size=128, seed=0, device="cpu",
                              augment=False)
            clf = train(s, Path(work) / name, show_progress=False)["model"].eval()
            row = {"model_top1": round(top1(clf, clf.prepare, images, labels), 2)}
            for exact in (False, True):
                modules = decompose(clf, train_set, settings=DecomposeSettings(calibration_samples=0,
                                                                               exact_only=exact, ci_samples=500))
                for mode in ("vote", "merged"):
                    started = time.perf_counter()
                    acc = top1(compose(modules, mode=mode).eval(), lambda x: x, images, labels)
                    key = f"{'exact_only' if exact else 'paper'}_{mode}"
                    row[key] = {"cost_pp": round(acc - row["model_top1"], 2),
                                "seconds": round(time.perf_counter() - started, 2)}
            rows[name] = row
            print(name, row, flush=True)
    summary = "; ".join(f"{n}: paper vote {r['paper_vote']['cost_pp']:+.2f} pp, exact_only vote "
                        f"{r['exact_only_vote']['cost_pp']:+.2f}, exact_only merged "
                        f"{r['exact_only_merged']['cost_pp']:+.2f} "
                        f"({r['exact_only_vote']['seconds'] / r['exact_only_merged']['seconds']:.0f}x faster)"
                        for n, r in rows.items())
    record("defaults_node", "python benchmarks/defaults.py " + " ".join(sys.argv[1:]), rows, summary)


if __name__ == "__main__":
    main()
