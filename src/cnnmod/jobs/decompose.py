"""Whole jobs as library calls (what ``cnnmod decompose`` runs): load, decompose, measure, save."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..artifacts import check_output
from ..composition.evaluate import binary_report
from ..composition.fitting import calibrate_decomposition
from ..composition.voting import compose
from ..core.metrics import predict_scores
from ..errors import UserError
from ..io.store import load_modules, save_decomposition
from ..models.classifier import split_for
from ..models.folder import load_model
from ..node.method import DecomposeSettings, chosen_classes, decompose
from ..progress import progress_bar, say
from ..runtime import Distributed, Passes, init_distributed, pick_device, seed_everything
from ..slim.config import MODULE_SIZE, SlimSettings
from ..slim.make import check_joint, slim_modules
from .common import Run

HEADS_UP = 2_000_000  # module passes (one module, one image) past which a step is announced with its cost


def heads_up(modules: int, images: int, step: str, what: str, remedy: str) -> None:
    """Say so before a step whose cost grows as modules x images (quadratic in classes) runs long."""
    if modules * images > HEADS_UP:
        say(f"{step}: each of the {modules} modules scores {images:,} {what} ({modules * images:,} module passes, "
            f"quadratic in classes); to go faster give {remedy}")


def gather_modules(modules: list, chosen: list[int], clf, out: Path, dd: Distributed, device) -> list:
    """Under torchrun, every rank's slim modules on every rank, in class order: each rank writes its own to a
    staging decomposition folder beside ``out``, then all read them all (the staging folders are removed)."""
    if not dd.active:
        return modules
    staging = [out.parent / f".{out.name}.rank{r}" for r in range(dd.world)]
    if modules:
        save_decomposition(modules, staging[dd.rank], overwrite=True, source=clf)
    dd.barrier()
    gathered = [m for folder in staging if folder.exists() for m in load_modules(folder, device)]
    dd.barrier()
    if dd.is_main:
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)
    position = {c: i for i, c in enumerate(chosen)}
    return sorted(gathered, key=lambda m: position[m.concerned])


def decompose_dir(model_dir: str | Path, out: str | Path, settings: DecomposeSettings | None = None,
                  run: Run | None = None, *, slim: SlimSettings | None = None, data: str | None = None,
                  classes: list[int] | None = None, measure: bool = True) -> dict:
    """Decompose the model in ``model_dir`` into ``out``: node-level modules (``settings``) or, with ``slim``,
    slim modules; observed on ``data`` (default: the model's own training split), for ``classes`` (default:
    all). With ``measure``, each module's binary accuracy on the test split is recorded in its config (one
    batched pass of all modules)."""
    settings, run = settings or DecomposeSettings(), run or Run()
    settings.check()
    if slim is not None:
        slim = slim.resolved(MODULE_SIZE)
        slim.check()
    batch_size = run.batch_size
    dd, dev = init_distributed(pick_device(run.device))
    if slim is not None and dd.active and slim.budget == "total":
        raise UserError("«budget» total prunes all modules together in one process: run it without torchrun, "
                        "or use «budget» module")
    if slim is not None and dd.active and slim.joint_heads > 0:
        raise UserError("«joint_heads» refits every module's head together in one process: run it without "
                        "torchrun, or leave «joint_heads» at 0")
    if dd.is_main:
        check_output(Path(out), run.overwrite)
    seed_everything(settings.seed)
    clf = load_model(model_dir, dev)
    chosen = chosen_classes(clf, classes)
    if slim is not None:
        check_joint(slim, chosen, clf.num_classes)
    train = split_for(clf, data, run.data_root, "train", resize=None)
    if settings.calibration_samples > 0 and dd.is_main:
        heads_up(len(chosen), settings.calibration_samples * 2 * clf.num_classes, "calibration",
                 "held-out training images", "--calibration-samples 1 (or 0)")
    meter = run.meter()
    if slim is not None:
        say(f"slimming {clf.arch} ({clf.num_classes} classes) to {slim.size:g} of its parameters"
            + (f" within {slim.max_loss:g} pp" if slim.max_loss is not None else "") + f", {slim.rule} importance"
            + (f", then their heads refitted together (weight {slim.joint_heads:g})" if slim.joint_heads else "")
            + (f", classes spread over {dd.world} processes" if dd.active else ""))
        started = time.perf_counter()
        mine = chosen[dd.rank::dd.world]  # each is an independent pruning run: the unit torchrun spreads
        with meter.phase("decomposition") as spent, progress_bar("slimming", len(mine), dd.is_main) as step:
            modules = slim_modules(clf, train, mine, slim, batch_size,
                                   done=lambda m: step(params=f"{m.metrics['params_fraction']:.2f}"))
            if settings.calibration_samples > 0 and modules:  # as for node-level modules
                calibrate_decomposition(modules, train, settings.calibration_samples, settings.seed, batch_size)
        modules = gather_modules(modules, chosen, clf, Path(out), dd, dev)
        seconds = round(time.perf_counter() - started, 3)
        variant = "channel"
    else:
        say(f"decomposing {clf.arch} ({clf.num_classes} classes) with {settings.variant}: up to "
            f"{settings.ci_samples} inputs per class of {train.name}")
        with meter.phase("decomposition") as spent:
            modules = decompose(clf, train, settings=settings, classes=classes,
                                passes=Passes(dev, batch_size, dd))
        seconds, variant = modules[0].settings["decomposition_seconds"], settings.variant
    energy = {"decomposition": spent.record.to_dict()}
    result = {"out": str(out), "seconds": seconds, "variant": variant}
    if measure:  # sharded over the ranks like the rest
        test = split_for(clf, data, run.data_root, "test", resize=None).subset([m.concerned for m in modules])
        if dd.is_main:
            heads_up(len(modules), len(test), "measuring", "test images", "--no-measure")
        comp = compose(modules).eval()
        started = time.perf_counter()
        with meter.phase("evaluation") as spent:
            scores = predict_scores(comp, lambda x: x, test.images, dev, max(8, 2 * batch_size // len(modules)), dd)
        energy["evaluation"] = spent.record.to_dict()
        for i, m in enumerate(modules):
            m.metrics.update(binary_report(scores, test.labels, i))
        result["measure_seconds"] = round(time.perf_counter() - started, 3)
    if not dd.is_main:
        return result
    training_seconds = clf.info.get("training", {}).get("seconds")
    extra = {"training_seconds": training_seconds,
             "seconds_to_training": round(seconds / training_seconds, 6) if training_seconds else None,
             "energy": energy}
    config = save_decomposition(modules, out, run.overwrite, extra, source=clf)
    result.update(extra)
    result["modules"] = [{**e, "path": str(Path(out) / e["path"])} for e in config["modules"]]
    for entry, m in zip(result["modules"], modules, strict=True):
        entry.update({k: v for k, v in m.metrics.items() if k != "kept_fraction"})
    return result
