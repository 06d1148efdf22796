"""Whole jobs as library calls (what ``cnnmod decompose`` runs): load, decompose, measure, save."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..artifacts import check_output
from ..composition.evaluate import binary_report
from ..composition.voting import compose
from ..core.metrics import predict_scores
from ..data.dataset import parse_class_list
from ..errors import UserError
from ..io.store import load_modules, save_decomposition
from ..models.classifier import chosen_classes, split_for
from ..models.folder import load_model
from ..modules.kinds import ModuleKind, kind_named, kinds
from ..progress import say
from ..recipes import parse_setting, settable, settings_for
from ..runtime import Clock, Distributed, Passes, init_distributed, pick_device, seed_everything
from .checkpoints import DecompositionState, restarted, state_folder
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


@dataclass(frozen=True)
class JobSettings:
    """Settings of the decomposition job itself, whatever kind of module it makes (``--set measure=false``):
    whether each module is measured on the test split, and the held-out training inputs per class that fit
    each module's score calibration (None: the kind's default, 100; 0: none)."""

    measure: bool = True
    calibration_samples: int | None = None

    def check(self) -> None:
        if self.calibration_samples is not None and self.calibration_samples < 0:
            raise UserError(f"«calibration_samples» must be >= 0, got {self.calibration_samples}")


@dataclass(frozen=True)
class Plan:
    """What ``cnnmod decompose``'s options ask for: the kind of module (``kinds``: the one asked for, or, where
    the options ask for none, every kind in the table's order, the first that fits the model making them), its
    ``recipe`` and the ``given`` fields of each candidate kind (typed), and the job's own settings."""

    kinds: tuple[ModuleKind, ...]
    recipe: str | None
    given: dict[str, dict]
    seed: int = 0
    job: JobSettings = JobSettings()

    def settings(self, kind: ModuleKind, every_class: bool = True, one_process: bool = True):
        return settings_for(kind, self.recipe, every_class=every_class, one_process=one_process,
                            **self.given[kind.name])


JOB_FIELDS = {f.name for f in fields(JobSettings)}


def plan_for(granularity: str | None, recipe: str | None, variant: str | None, size: float | None,
             max_loss: float | None, seed: int, given: dict[str, str]) -> Plan:
    """The plan ``cnnmod decompose``'s options make (``given``: ``--set`` KEY=VALUE texts). ``granularity``
    None: the kind that the options ask for alone (a recipe or a setting only it has: a size, a slim recipe;
    a variant, the paper's recipe); where they ask for none, the model decides (:class:`Plan`). Everything that
    can be refused is refused here, before the model loads."""
    job = JobSettings(**{k: parse_setting(JobSettings, k, given.pop(k)) for k in list(given) if k in JOB_FIELDS})
    job.check()
    typed = {k: v for k, v in (("variant", variant), ("size", size), ("max_loss", max_loss)) if v is not None}
    table = kinds()
    if granularity is not None:
        candidates = (kind_named(granularity),)
    else:
        def only(kind: ModuleKind, names) -> set[str]:
            others = {n for k in table.values() if k is not kind for n in names(k)}
            return set(names(kind)) - others

        asked = [k for k in table.values()
                 if recipe in only(k, lambda k: k.names)
                 or any(key in only(k, lambda k: settable(k.settings)) for key in [*given, *typed])]
        if len(asked) > 1:
            raise UserError(f"these options ask for {' and '.join(k.what for k in asked)} at once: choose one with "
                            "«granularity»")
        candidates = tuple(asked) or tuple(table.values())
    known = {n for kind in candidates for n in settable(kind.settings)}
    for key in given:
        if key not in known:
            parse_setting(candidates[0].settings, key, given[key])  # says which settings there are
    per_kind = {}
    for kind in candidates:
        names = settable(kind.settings)
        mine = {k: parse_setting(kind.settings, k, v) for k, v in given.items() if k in names or len(candidates) == 1}
        per_kind[kind.name] = {**mine, **typed, "seed": seed}
    plan = Plan(candidates, recipe, per_kind, seed, job)
    for kind in candidates:
        plan.settings(kind).check()  # refused now, before the model loads, if it cannot be
    return plan


def decompose_dir(model_dir: str | Path, out: str | Path, plan: Plan | None = None, run: Run | None = None, *,
                  data: str | None = None, classes: list[int] | str | None = None, resume: bool = False) -> dict:
    """Decompose the model in ``model_dir`` into ``out`` as ``plan`` asks (default: what ``cnnmod decompose``
    does with no options); observed on ``data`` (default: the model's own training split), for ``classes``
    (default: all; indices, or a text of indices and names). With the plan's ``measure``, each module's binary
    accuracy on the test split is recorded in its config (one batched pass of all modules). While it runs, its
    finished parts are kept in ``OUT.resume`` (:mod:`.checkpoints`); with ``resume`` (or in a run torchrun
    restarted), a run of the same settings that stopped goes on from them."""
    wall = time.perf_counter()
    plan, run = plan or plan_for(None, None, None, None, None, 0, {}), run or Run()
    batch_size = run.batch_size
    dd, dev = init_distributed(pick_device(run.device))
    if dd.is_main:
        check_output(Path(out), run.overwrite)
    seed_everything(plan.seed)
    clf = load_model(model_dir, dev)
    if isinstance(classes, str):
        classes = parse_class_list(classes, clf.class_names)
    chosen = chosen_classes(clf, classes)
    kind = chosen_kind(plan, clf, dd)
    settings = plan.settings(kind, every_class=len(chosen) == clf.num_classes, one_process=not dd.active)
    settings.check()
    kind.check(settings, chosen, clf.num_classes, dd.world)
    train = split_for(clf, data, run.data_root, "train", resize=None)
    state = DecompositionState(state_folder(out), {
        "model": clf.info.get("weights_sha256"), "data": train.name, "classes": chosen, "kind": kind.name,
        "settings": asdict(settings), "batch_size": batch_size})
    if dd.is_main:
        state.start(resume or restarted(), run.overwrite)
    dd.barrier()
    samples = plan.job.calibration_samples
    if samples is None:
        samples = getattr(settings, "calibration_samples", 100)
    if samples > 0 and dd.is_main:
        heads_up(len(chosen), samples * 2 * clf.num_classes, "calibration", "held-out training images",
                 "--set calibration_samples=1 (or 0)")
    meter, clock = run.meter(), Clock()
    say(kind.describe(clf, settings, train, dd.world))
    mine = chosen[dd.rank::dd.world] if kind.spreads else chosen  # a spread kind's classes: one process each
    with meter.phase("decomposition") as spent:
        modules = kind.decompose(clf, train, settings, mine, Passes(dev, batch_size, dd, keep=state), clock,
                                 plan.job.calibration_samples)
    if kind.spreads:
        modules = gather_modules(modules, chosen, clf, Path(out), dd, dev)
    parts = clock.rounded("decomposition", "calibration")
    energy = {"decomposition": spent.record.to_dict()}
    result = {"out": str(out), "variant": getattr(settings, "variant", kind.name)}
    if plan.job.measure:  # sharded over the ranks like the rest
        with meter.phase("evaluation") as spent, clock("measure"):
            measure_modules(modules, clf, split_for(clf, data, run.data_root, "test", resize=None), dev,
                            batch_size, dd)
        energy["evaluation"] = spent.record.to_dict()
        parts.update(clock.rounded("measure"))
    if not dd.is_main:
        return result
    training_seconds = clf.info.get("training", {}).get("seconds")
    making = parts["decomposition_seconds"] + parts["calibration_seconds"]
    extra = {"training_seconds": training_seconds,
             "seconds_to_training": round(making / training_seconds, 6) if training_seconds else None,
             "energy": energy}
    config = save_decomposition(modules, out, run.overwrite, extra, source=clf)
    state.remove()  # the decomposition is written: nothing left to resume
    result.update(extra)
    result["modules"] = [{**e, "path": str(Path(out) / e["path"])} for e in config["modules"]]
    for entry, m in zip(result["modules"], modules, strict=True):
        entry.update({k: v for k, v in m.metrics.items() if k != "kept_fraction"})
    return {"seconds": round(time.perf_counter() - wall, 3), **parts, **result}


def chosen_kind(plan: Plan, clf, dd: Distributed) -> ModuleKind:
    """The plan's kind; where it leaves the choice to the model, the first that fits it, saying why when that is
    not the first in the table."""
    refused = []
    for kind in plan.kinds:
        why = kind.fits(clf)
        if why is None:
            if refused and dd.is_main:
                say(f"{refused[0][0].what} cannot be made of this model, so {kind.what} (--granularity "
                    f"{kind.name}): {refused[0][1].for_command_line({})}")
            return kind
        refused.append((kind, why))
    raise refused[0][1]


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
