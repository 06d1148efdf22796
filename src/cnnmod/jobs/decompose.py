"""Whole jobs as library calls (what ``cnnmod decompose`` runs): load, decompose, measure, save."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..artifacts import check_output
from ..composition.evaluate import binary_report
from ..composition.fitting import calibrate_decomposition
from ..composition.voting import compose
from ..core.graph import ModelGraph
from ..core.metrics import predict_scores
from ..data.dataset import parse_class_list
from ..errors import UserError
from ..io.store import load_modules, save_decomposition
from ..models.classifier import split_for
from ..models.folder import load_model
from ..node.method import DecomposeSettings, chosen_classes, decompose
from ..progress import progress_bar, say
from ..recipes import node_settings, parse_setting, settable, slim_settings
from ..runtime import Distributed, Passes, init_distributed, pick_device, seed_everything
from ..slim.config import MODULE_SIZE, RECIPES, SlimSettings
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


def settings_for(granularity: str | None, recipe: str | None, variant: str | None, size: float | None,
                 max_loss: float | None, seed: int, given: dict[str, str]) -> tuple[DecomposeSettings, object, bool]:
    """What ``cnnmod decompose``'s options ask for: the node-level settings (also the calibration's), the slim
    settings as a function of the run (None for node-level modules; :func:`cnnmod.recipes.slim_settings`), and
    whether each module is measured on the test split. ``given``: ``--set`` KEY=VALUE texts. ``granularity``
    None: whichever the options ask for (a size, a slim recipe or setting: channel; a variant or a node setting:
    node); where they ask for neither, the slim settings come as :class:`ByModel` (the model decides)."""
    measure = parse_setting(JobSettings, "measure", given.pop("measure")) if "measure" in given else True
    node_names, slim_names = set(settable(DecomposeSettings)), set(settable(SlimSettings))
    if granularity is None:
        slim_asked = size is not None or max_loss is not None or recipe in RECIPES or \
            any(k in slim_names and k not in node_names for k in given)
        node_asked = variant is not None or any(k in node_names and k not in slim_names for k in given)
        if slim_asked != node_asked:
            granularity = "channel" if slim_asked else "node"
    variant = variant or "mc-bln"
    if granularity is None:
        node = settings_for("node", recipe, variant, None, None, seed, dict(given))[0]
        slim_given = {k: v for k, v in given.items() if k in slim_names or k == "calibration_samples"}
        return node, ByModel(settings_for("channel", recipe, variant, None, None, seed, slim_given)[1]), measure
    if granularity not in ("node", "channel"):
        raise UserError(f"unknown granularity {granularity!r}; use node or channel")
    node_given = {k: parse_setting(DecomposeSettings, k, v) for k, v in given.items() if k in node_names}
    if granularity == "node":
        if size is not None or max_loss is not None:
            raise UserError("«size» and «max_loss» apply to slim modules: add «granularity» channel")
        rest = [k for k in given if k not in node_names]
        if rest:
            parse_setting(DecomposeSettings, rest[0], given[rest[0]])  # says which settings there are
        return node_settings(recipe, variant=variant, seed=seed, **node_given), None, measure
    calibration = {k: v for k, v in node_given.items() if k == "calibration_samples"}
    slim_given = {k: parse_setting(SlimSettings, k, v) for k, v in given.items() if k != "calibration_samples"}
    for k, v in (("size", size), ("max_loss", max_loss)):
        if v is not None:
            slim_given[k] = v
    slim_settings(recipe, **slim_given, seed=seed)  # refused now, before the model loads, if it cannot be
    return (DecomposeSettings(seed=seed, **calibration), partial(slim_settings, recipe, **slim_given, seed=seed),
            measure)


@dataclass(frozen=True)
class ByModel:
    """Slim settings (as :func:`settings_for` gives them) for a model without the ReLU-family activations the
    paper's node rule needs; a model with them gets node-level modules. What no granularity given means."""

    slim: Callable[..., SlimSettings]


def _follows_node_rule(clf) -> bool:
    """Whether the model's hidden activations are of the ReLU family the paper's node rule needs."""
    try:
        ModelGraph(clf.net, clf.spec.shape).require_relu()
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class JobSettings:
    """Settings of the decomposition job itself (``--set measure=false``)."""

    measure: bool = True


def decompose_dir(model_dir: str | Path, out: str | Path, settings: DecomposeSettings | None = None,
                  run: Run | None = None, *, slim: SlimSettings | Callable[..., SlimSettings] | ByModel | None = None,
                  data: str | None = None, classes: list[int] | str | None = None, measure: bool = True) -> dict:
    """Decompose the model in ``model_dir`` into ``out``: node-level modules (``settings``) or, with ``slim``,
    slim modules (its settings, or a function of ``every_class`` and ``one_process`` that gives them:
    :func:`cnnmod.recipes.slim_settings`); observed on ``data`` (default: the model's own training split), for
    ``classes`` (default: all; indices, or a text of indices and names). With ``measure``, each module's binary
    accuracy on the test split is recorded in its config (one batched pass of all modules). ``slim`` a
    :class:`ByModel`: node-level modules where the model follows the paper's node rule, else slim ones."""
    wall = time.perf_counter()
    settings, run = settings or DecomposeSettings(), run or Run()
    settings.check()
    batch_size = run.batch_size
    dd, dev = init_distributed(pick_device(run.device))
    if dd.is_main:
        check_output(Path(out), run.overwrite)
    seed_everything(settings.seed)
    clf = load_model(model_dir, dev)
    if isinstance(classes, str):
        classes = parse_class_list(classes, clf.class_names)
    chosen = chosen_classes(clf, classes)
    if isinstance(slim, ByModel):
        by_model, slim = slim, None if _follows_node_rule(clf) else slim.slim
        if slim is by_model.slim and dd.is_main:
            say("the paper's node rule needs ReLU-family activations, which this model lacks: slim modules "
                "(--granularity channel)")
    if callable(slim):
        slim = slim(every_class=len(chosen) == clf.num_classes, one_process=not dd.active)
    if slim is not None:
        slim = slim.resolved(MODULE_SIZE)
        slim.check()
        check_joint(slim, chosen, clf.num_classes)
        check_one_process(slim, dd)
    train = split_for(clf, data, run.data_root, "train", resize=None)
    if settings.calibration_samples > 0 and dd.is_main:
        heads_up(len(chosen), settings.calibration_samples * 2 * clf.num_classes, "calibration",
                 "held-out training images", "--set calibration_samples=1 (or 0)")
    meter = run.meter()
    if slim is not None:
        say(f"slimming {clf.arch} ({clf.num_classes} classes) to {slim.size:g} of its parameters"
            + (f" within {slim.max_loss:g} pp" if slim.max_loss is not None else "") + f", {slim.rule} importance"
            + (f", then their heads refitted together (weight {slim.joint_heads:g})" if slim.joint_heads else "")
            + (f", classes spread over {dd.world} processes" if dd.active else ""))
        started = time.perf_counter()
        mine = chosen[dd.rank::dd.world]  # each is an independent pruning run: the unit torchrun spreads
        with meter.phase("decomposition") as spent:
            with progress_bar("slimming", len(mine), dd.is_main) as step:
                modules = slim_modules(clf, train, mine, slim, batch_size,
                                       done=lambda m: step(params=f"{m.metrics['params_fraction']:.2f}"))
            parts = {"decomposition_seconds": round(time.perf_counter() - started, 3)}
            started = time.perf_counter()
            if settings.calibration_samples > 0 and modules:  # as for node-level modules
                calibrate_decomposition(modules, train, settings.calibration_samples, settings.seed, batch_size,
                                        dd.is_main)
            parts["calibration_seconds"] = round(time.perf_counter() - started, 3)
        modules = gather_modules(modules, chosen, clf, Path(out), dd, dev)
        variant = "channel"
    else:
        ModelGraph(clf.net, clf.spec.shape).require_relu()  # before anything is said: a refusal is one line
        say(f"decomposing {clf.arch} ({clf.num_classes} classes) with {settings.variant}: up to "
            f"{settings.ci_samples} inputs per class of {train.name}")
        with meter.phase("decomposition") as spent:
            modules = decompose(clf, train, settings=settings, classes=classes,
                                passes=Passes(dev, batch_size, dd))
        parts = {k: modules[0].settings.get(k, 0.0) for k in ("decomposition_seconds", "calibration_seconds")}
        variant = settings.variant
    energy = {"decomposition": spent.record.to_dict()}
    result = {"out": str(out), "variant": variant}
    if measure:  # sharded over the ranks like the rest
        started = time.perf_counter()
        with meter.phase("evaluation") as spent:
            measure_modules(modules, clf, split_for(clf, data, run.data_root, "test", resize=None), dev,
                            batch_size, dd)
        energy["evaluation"] = spent.record.to_dict()
        parts["measure_seconds"] = round(time.perf_counter() - started, 3)
    if not dd.is_main:
        return result
    training_seconds = clf.info.get("training", {}).get("seconds")
    making = parts["decomposition_seconds"] + parts["calibration_seconds"]
    extra = {"training_seconds": training_seconds,
             "seconds_to_training": round(making / training_seconds, 6) if training_seconds else None,
             "energy": energy}
    config = save_decomposition(modules, out, run.overwrite, extra, source=clf)
    result.update(extra)
    result["modules"] = [{**e, "path": str(Path(out) / e["path"])} for e in config["modules"]]
    for entry, m in zip(result["modules"], modules, strict=True):
        entry.update({k: v for k, v in m.metrics.items() if k != "kept_fraction"})
    return {"seconds": round(time.perf_counter() - wall, 3), **parts, **result}


def check_one_process(slim: SlimSettings, dd: Distributed) -> None:
    """What torchrun cannot spread over its processes, refused before any work."""
    if dd.active and slim.budget == "total":
        raise UserError("«budget» total prunes all modules together in one process: run it without torchrun, "
                        "or use «budget» module")
    if dd.active and slim.joint_heads > 0:
        raise UserError("«joint_heads» refits every module's head together in one process: run it without "
                        "torchrun, or leave «joint_heads» at 0")


def measure_modules(modules: list, clf, test, device, batch_size: int, dd: Distributed) -> None:
    """Each module alone as a detector of its class, on the test images of the decomposed classes: its calibrated
    probability (Platt, fitted on held-out training images with both classes weighted equally; the raw score
    where it has no calibration) over 0.5, against the model's own one-vs-rest decision (its arg-max is the
    class) on the same images. One batched pass of all modules and one of the model; in each module's
    metrics."""
    test = test.subset([m.concerned for m in modules])
    if dd.is_main:
        heads_up(len(modules), len(test), "measuring", "test images", "--set measure=false")
    calibrated = all(m.calibration for m in modules)
    comp = compose(modules, calibration="platt" if calibrated else "none").eval()
    scores = predict_scores(comp, lambda x: x, test.images, device, max(8, 2 * batch_size // len(modules)), dd)
    model_scores = predict_scores(clf, clf.prepare, test.images, device, batch_size, dd)
    predicted = model_scores.argmax(1)
    for i, m in enumerate(modules):
        m.metrics.update(binary_report(scores, test.labels, i))
        m.metrics["calibrated"] = calibrated
        model = binary_report(scores, test.labels, i, votes=predicted == m.concerned)
        m.metrics["model_balanced_accuracy"] = model["balanced_accuracy"]
