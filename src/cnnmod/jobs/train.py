"""``cnnmod train`` as a library call: a model trained from scratch (:func:`cnnmod.models.train.fit`), its
best-validation checkpoint written to a model folder (the last epoch in ``last/``), energy metered; resumable
after any epoch (:mod:`cnnmod.models.resume`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..artifacts import atomic_folder, check_output
from ..core.metrics import evaluate_classifier
from ..data import load
from ..data.dataset import split_train_val
from ..data.registry import default_augment
from ..data.transforms import InputSpec
from ..energy import EnergyMeter, training_energy
from ..errors import UserError
from ..models import build
from ..models.classifier import Classifier
from ..models.folder import save_into
from ..models.reference import trusting
from ..models.registry import create
from ..models.resume import read_state, resume_folder, stopped_at, write_state
from ..models.train import TrainSettings, fit, require_in_memory
from ..progress import say
from ..runtime import Passes, init_distributed, pick_device, seed_everything


def train(s: TrainSettings, out: str | Path | None, overwrite: bool = False, show_progress: bool = True,
          resume: bool = False) -> dict:
    """Train ``s.arch`` on ``s.data``; write the best-validation model to ``out`` and the last epoch to ``out/last``.
    While it trains, the last finished epoch is kept in ``OUT.resume`` (:mod:`cnnmod.models.resume`); with
    ``resume``, a run of the same settings that stopped there is gone on with (else one starts)."""
    s = s.resolved()
    device = pick_device(s.device)
    dd, device = init_distributed(device)
    settings = {k: v for k, v in asdict(s).items() if k != "data_root"}
    kept = resume_folder(out) if out is not None else None
    if out is not None and dd.is_main:
        check_output(Path(out), overwrite)
        if kept.exists() and not resume:
            if not overwrite:
                raise UserError(f"{kept} holds {stopped_at(kept)} of a training run that stopped: add «resume» to "
                                "go on from it, or «overwrite» to start again")
            shutil.rmtree(kept)
    dd.barrier()
    start = read_state(kept, settings) if resume and kept is not None and kept.exists() else None
    seed_everything(s.seed)
    full_train = load(s.data, "train", s.data_root, s.classes)
    require_in_memory(full_train)
    test = load(s.data, "test", s.data_root, s.classes)
    for c in range(full_train.num_classes):
        if not bool((full_train.labels == c).any()):
            raise UserError(f"class {c} ({full_train.class_names[c]}) of {s.data} has no training images")
    train_set, val_set = split_train_val(full_train, s.val_split, s.subset, s.seed)
    c, h, w = full_train.input_shape
    if s.input_size is not None:
        h, w = (int(v) for v in s.input_size)
    spec = InputSpec(c, h, w, full_train.mean, full_train.std)
    with trusting(True):  # the user named the architecture
        arch, arch_args, model = create(s.arch, s.arch_args, spec.shape, full_train.num_classes)
    model = model.to(device)
    if dd.is_main:
        say(f"training {s.arch} on {s.data}: {len(train_set)} images, {len(val_set) if val_set else 0} for validation, "
            f"{full_train.num_classes} classes, {s.epochs} epochs on {device}" + (f" x{dd.world}" if dd.active else "")
            + (f"; going on after epoch {start['epoch']} ({kept})" if start is not None else ""))

    def keep(state: dict) -> None:
        if dd.is_main:
            write_state(kept, state, settings)

    started = time.perf_counter()
    result = fit(model, (train_set, val_set), spec, s, default_augment(s.data, s.data_root),
                 Passes(device, s.batch_size, dd, show_progress), start, keep if kept is not None else None)
    last_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - started + result["earlier_seconds"]
    resumed = {"resumed_after_epoch": result["resumed_after"]} if result["resumed_after"] else {}
    info_base = {"training": {**settings, "world_size": dd.world, "history": result["history"],
                              "best_epoch": result["best_epoch"], "seconds": round(seconds, 3), **resumed}}

    def classifier(state: dict) -> Classifier:
        with trusting(True):
            net = build(arch, spec.shape, full_train.num_classes, **arch_args)
        net.load_state_dict(state)
        return Classifier(net, spec, full_train.class_names, arch, arch_args, s.data,
                          full_train.source_classes, dict(info_base))

    best, last = classifier(result["best_state"]), classifier(last_state)
    summary = {}
    if dd.is_main:
        eval_device = device if device.type == "cuda" else torch.device("cpu")
        history = result["history"]
        val_of = {"best": next((h.get("val_top1") for h in history if h["epoch"] == result["best_epoch"]), None),
                  "last": history[-1].get("val_top1")}
        for clf, name in ((best, "best"), (last, "last")):
            report = evaluate_classifier(clf, test, eval_device)
            clf.info["metrics"] = {"test_top1": report["top1"], "test_top5": report["top5"], "val_top1": val_of[name]}
            summary[name] = report
        if out is not None:
            with atomic_folder(out, overwrite) as tmp:
                save_into(best, tmp)
                save_into(last, tmp / "last")
            shutil.rmtree(kept, ignore_errors=True)  # the model is written: nothing left to resume
    dd.barrier()
    ips = result["images_seen"] / max(result["train_seconds"], 1e-9)
    return {"out": str(out) if out is not None else None, "epochs": s.epochs, "best_epoch": result["best_epoch"],
            "test_top1": summary.get("best", {}).get("top1"), "test_top5": summary.get("best", {}).get("top5"),
            "last_test_top1": summary.get("last", {}).get("top1"),
            "seconds": round(seconds, 3), "seconds_per_epoch": round(result["train_seconds"] / s.epochs, 3),
            "images_per_second": round(ips, 1), "world_size": dd.world, "device": str(device),
            "history": result["history"], **resumed, "model": best}


def train_dir(s: TrainSettings, out: str | Path, overwrite: bool = False, country: str | None = None,
              resume: bool = False) -> dict:
    """``cnnmod train``: :func:`train` with its energy (all of it, and its share up to the best epoch; a resumed run
    counts the epochs before it at the power measured for its own)."""
    with EnergyMeter(country).phase("training") as spent:
        result = train(s, out, overwrite=overwrite, resume=resume)
    result["energy"] = training_energy(spent.record, result["history"], result["best_epoch"],
                                       result.get("resumed_after_epoch", 0))
    return result
