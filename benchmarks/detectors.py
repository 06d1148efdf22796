"""Each node-level module alone as a detector of its class: balanced accuracy (the mean of its true positive and
true negative rates) on the test split, its calibrated probability over 0.5 (the default, as ``cnnmod
decompose`` records it on every card) and its raw score over 0.5 (before), against the model's own one-vs-rest
decision (its arg-max is the class) on the same images.

    .venv/bin/python benchmarks/detectors.py MODEL_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

import cnnmod  # noqa: E402
from cnnmod.composition.evaluate import binary_report  # noqa: E402
from cnnmod.composition.voting import compose  # noqa: E402
from cnnmod.core.metrics import predict_scores  # noqa: E402
from cnnmod.jobs.common import Run  # noqa: E402
from cnnmod.jobs.decompose import decompose_dir, plan_for  # noqa: E402
from cnnmod.models.classifier import split_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        out = Path(args.out or Path(work) / "modules")
        plan = plan_for("node", None, None, None, None, 0, {})
        result = decompose_dir(args.model, out, plan, Run(device="cpu", overwrite=True))
        modules = cnnmod.load_modules(out)
        clf = cnnmod.load_model(args.model)
        test = split_for(clf, None, None, "test")
        raw = predict_scores(compose(modules, calibration="none").eval(), lambda x: x, test.images,
                             torch.device("cpu"), 64)
    rows = []
    for i, entry in enumerate(result["modules"]):
        before = binary_report(raw, test.labels, i)
        rows.append({"class": entry["name"], "model": entry["model_balanced_accuracy"],
                     "calibrated": entry["balanced_accuracy"], "raw": before["balanced_accuracy"],
                     "calibrated_tpr": entry["true_positive_rate"], "calibrated_tnr": entry["true_negative_rate"],
                     "raw_tpr": before["true_positive_rate"], "raw_tnr": before["true_negative_rate"]})
        print(rows[-1], flush=True)
    worst = min(r["calibrated"] - r["model"] for r in rows)
    worst_raw = min(r["raw"] - r["model"] for r in rows)
    within = sum(r["calibrated"] >= r["model"] - 2 for r in rows)  # within 2 pp of it, or better
    record("detectors", "python benchmarks/detectors.py " + " ".join(sys.argv[1:]),
           {"modules": rows, "seconds": result["seconds"]},
           f"node-level modules alone, balanced accuracy against the model's one-vs-rest: calibrated (the default) "
           f"{within} of {len(rows)} within 2 pp or better, worst {worst:+.2f} pp; raw scores (before) worst "
           f"{worst_raw:+.2f}")


if __name__ == "__main__":
    main()
