"""What keeping a decomposition's finished parts costs, and what a stop costs with ``--resume``.

A ResNet-20 trained briefly on Fashion-MNIST (or ``--model``), decomposed into its ten classes' modules, node-level
and slim (the defaults), each made side by side with its parts kept (``cnnmod decompose``'s ``OUT.resume``) and
without, alternated ``--repeats`` times; the seconds spent writing the parts are counted too (the share that
does not depend on what else the machine runs). (That a stopped run resumes to the same modules, byte for byte, is
tests/test_resume.py's.)"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, record

sys.path.insert(0, str(ROOT / "src"))

from cnnmod.jobs.checkpoints import DecompositionState  # noqa: E402
from cnnmod.jobs.decompose import plan_for  # noqa: E402
from cnnmod.models.classifier import split_for  # noqa: E402
from cnnmod.models.folder import load_model  # noqa: E402
from cnnmod.runtime import Clock, Passes  # noqa: E402


def trained(folder: Path, subset: int, epochs: int) -> Path:
    from cnnmod.cli import main

    if not (folder / "config.json").is_file():
        rc = main(["train", "--arch", "resnet20", "--data", "fashion-mnist", "--epochs", str(epochs), "--subset",
                   str(subset), "--out", str(folder), "--overwrite"])
        assert rc == 0
    return folder


def making(clf, train, granularity: str, keep) -> float:
    plan = plan_for(granularity, None, None, None, None, 0, {})
    kind = plan.kinds[0]
    settings = plan.settings(kind)
    started = time.perf_counter()
    kind.decompose(clf, train, settings, list(range(clf.num_classes)), Passes(batch_size=256, progress=False,
                   keep=keep), Clock(), 0)
    return time.perf_counter() - started


class TimedState(DecompositionState):
    """The decomposition's state, with the seconds spent writing its parts counted."""

    writing = 0.0

    def write(self, name, config, tensors):
        started = time.perf_counter()
        super().write(name, config, tensors)
        self.writing += time.perf_counter() - started

    def keep_module(self, module):
        started = time.perf_counter()
        super().keep_module(module)
        self.writing += time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "out" / "resume_resnet20")
    ap.add_argument("--subset", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    clf = load_model(trained(args.model, args.subset, args.epochs))
    train = split_for(clf, None, None, "train", resize=None)
    figures = {}
    for granularity in ("node", "channel"):
        plain, kept, writing = [], [], []
        for _ in range(args.repeats):
            plain.append(making(clf, train, granularity, None))
            work = Path(tempfile.mkdtemp())
            state = TimedState(work / "dec.resume", {"benchmark": granularity})
            state.start(False, False)
            kept.append(making(clf, train, granularity, state))
            writing.append(state.writing / kept[-1])
            parts = sum(f.stat().st_size for f in state.folder.rglob("*") if f.is_file())
            shutil.rmtree(work)
        figures[granularity] = {"plain_s": [round(s, 2) for s in plain], "kept_s": [round(s, 2) for s in kept],
                                "overhead": round(statistics.median(kept) / statistics.median(plain) - 1, 4),
                                "writing_share": round(statistics.median(writing), 4),
                                "state_mb": round(parts / 2 ** 20, 2)}
        print(granularity, figures[granularity], flush=True)
    summary = "; ".join(f"{g}: writing its parts takes {100 * f['writing_share']:.2f} % of the run, kept vs not "
                        f"{100 * f['overhead']:+.1f} % ({f['state_mb']} MB kept)" for g, f in figures.items())
    record("resume", "python benchmarks/resume.py", {"settings": vars(args) | {"model": str(args.model)},
                                                     "torch_threads": torch.get_num_threads(), **figures}, summary)


if __name__ == "__main__":
    main()
