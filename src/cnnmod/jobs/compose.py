"""``cnnmod compose``, ``replace`` and ``remove`` as library calls (docs/method.md, "Composition" and
"Continuous learning"): module folders in (a decomposition or composition folder stands for all its modules), a
composition folder out, energy metered, a JSON result. No training."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifacts import check_output
from ..composition.base import COMPOSER_KINDS, find_class
from ..composition.build import Sources, build, composing_for, composition_defaults, mode_and_calibration
from ..composition.voting import check_calibration, check_composable, check_mode
from ..errors import UserError
from ..io.store import composition_setting, load_modules, save_composition, save_network, source_models
from ..modules.base import BinaryModule
from ..modules.kinds import kind_of, kinds
from ..progress import say
from ..reuse import continuous_learning, refit_composition
from ..runtime import pick_device
from .common import Run, seconds_since
from .evaluate import EvaluateSettings, evaluate_dir


@dataclass(frozen=True)
class ComposeSettings:
    """How ``cnnmod compose`` builds its classifier: continuous learning and refitted heads (modules whose kind
    relearns and refits), how scores are compared (``calibration``) and run (``mode``; None: as
    :func:`cnnmod.composition.build.mode_and_calibration` chooses for the modules), and, for a composition with a
    pruning of its own (a merged slim one), how far it is pruned (``size``, ``max_loss``; ``pruning``: its other
    fields, :func:`cnnmod.slim.config.merged_settings`)."""

    continuous_learning: bool = False
    refit_heads: bool = False
    calibration: str | None = None
    mode: str | None = None
    size: float | None = None
    max_loss: float | None = None
    pruning: dict = field(default_factory=dict)

    def resolved(self, modules: Sequence[BinaryModule]) -> tuple[ComposeSettings, str]:
        """The mode and calibration chosen where not given
        (:func:`cnnmod.composition.build.mode_and_calibration`), and a line saying what was chosen and why ("" when
        both were given)."""
        mode, calibration, why = mode_and_calibration(modules, self.mode, self.calibration,
                                        self.continuous_learning or self.refit_heads)
        if self.mode is not None and self.calibration is not None:
            return self, ""
        return replace(self, mode=mode, calibration=calibration), f"mode {mode}, calibration {calibration}: {why}"

    @property
    def asked_pruning(self) -> dict:
        """The composition's own pruning, as asked."""
        asked = {k: v for k, v in (("size", self.size), ("max_loss", self.max_loss)) if v is not None}
        return {**asked, **self.pruning}

    def check(self, modules: Sequence[BinaryModule]) -> None:
        """Everything that can be said against these settings for ``modules`` before any work starts."""
        check_composable(modules)
        if self.refit_heads or self.continuous_learning:
            what = "«refit_heads»" if self.refit_heads else "«continuous_learning»"
            kind = next((kind_of(m) for m in modules if not kind_of(m).refits), None)
            if kind is not None:
                refitting = " or ".join(k.what for k in kinds().values() if k.refits)
                raise UserError(f"{what} works on {refitting}; these include {kind.what} (their heads were fitted "
                                f"when they were made): compose {refitting}, or drop the option")
        if self.continuous_learning and any(kind_of(m).relearn is None for m in modules):
            raise UserError("«continuous_learning» needs modules whose kind relearns; compose those, or drop it")
        composing = composing_for(modules, self.mode, self.asked_pruning)
        if composing is not None and composing.network:
            return  # it checks its own settings as it is built
        check_mode(modules, self.mode)
        check_calibration(modules, self.calibration, self.mode)


def _summary(config: dict, out: Path, started: float) -> dict:
    return {"out": str(out), "classes": [e["name"] for e in config["classes"]], "sources": config["sources"],
            "kept_fraction_mean": round(sum(e["kept_fraction"] for e in config["classes"]) / len(config["classes"]), 6),
            "seconds": seconds_since(started)}


def compose_dirs(paths: Sequence[str | Path], out: str | Path, settings: ComposeSettings | None = None,
                 run: Run | None = None) -> dict:
    """``cnnmod compose``: the modules of ``paths`` as one composition folder."""
    s, run = settings or ComposeSettings(), run or Run()
    started = time.perf_counter()
    check_output(Path(out), run.overwrite)
    dev = pick_device(run.device)
    with run.meter().phase("composition") as spent:
        modules = load_modules(paths, dev)
        s, why = s.resolved(modules)
        s.check(modules)
        composing = composing_for(modules, s.mode, s.asked_pruning)
        made_from = {"made_from": [str(p) for p in paths]}
        if composing is not None and composing.network:
            sources = Sources(source_models(paths, dev), data_root=run.data_root, batch_size=run.batch_size)
            composer = build(modules, s.mode, s.calibration, sources, **s.asked_pruning)
            models = [sources.models[sha] for sha in dict.fromkeys(composer.source_shas)]
            save_network(composing.name, composer, models, out, run.overwrite, made_from)
            result = {"out": str(out), "classes": composer.qualified_names, "mode": s.mode,
                      **COMPOSER_KINDS[composing.name].summary(composer, models)}
        else:
            if s.continuous_learning:
                modules = continuous_learning(modules, run.data_root, dev, run.batch_size, refit=s.refit_heads)
            elif s.refit_heads:
                modules = refit_composition(modules, run.data_root, run.batch_size)
            config = save_composition(modules, out, run.overwrite, {"continuous_learning": s.continuous_learning,
                                                                    "refit_heads": s.refit_heads,
                                                                    "calibration": s.calibration, "mode": s.mode,
                                                                    **made_from})
            result = {**_summary(config, Path(out), started), "calibration": s.calibration, "mode": s.mode}
    if why:  # once it is made: a mistake found on the way stays the one line said
        say(f"composed with {why}")
    energy = {"composition": spent.record.to_dict()}
    try:  # what it scores on its classes' test images, beside the model where one model made it all
        scored = evaluate_dir([out], EvaluateSettings(cost=False), run)
        result.update({k: scored[k] for k in ("composed_top1", "model_top1", "test_images") if k in scored})
        energy["evaluation"] = scored["energy"]["evaluation"]
    except UserError as e:  # the composition is made; only its test images are out of reach
        say(f"{out} is made but not evaluated: {e}")
    result["seconds"] = seconds_since(started)
    return {**result, "energy": energy}


def inherited_settings(target: str | Path) -> dict:
    """What a composition made from ``target`` keeps of it: how its scores are compared and run."""
    return {"calibration": composition_setting([target], "calibration", "none"),
            "mode": composition_setting([target], "mode", "vote")}


def replace_dir(target: str | Path, cls: str, replacement: str | Path, out: str | Path,
                run: Run | None = None) -> dict:
    """``cnnmod replace``: the module of class ``cls`` swapped for the one module at ``replacement``."""
    run = run or Run()
    started = time.perf_counter()
    check_output(Path(out), run.overwrite)
    dev = pick_device(run.device)
    modules = load_modules(target, dev)
    position = find_class([m.ref for m in modules], cls)
    new = load_modules(replacement, dev)
    if len(new) != 1:
        raise UserError(f"«replacement» must be one module folder; {replacement} holds {len(new)} modules (pick one "
                        "of its modules/ folders)")
    old = modules[position]
    modules[position] = new[0]
    if new[0].ref.key in [m.ref.key for i, m in enumerate(modules) if i != position]:
        raise UserError(f"the composition has class {new[0].ref.qualified} already; replace that class instead")
    mode, calibration, why = composition_defaults(modules)
    inherited = inherited_settings(target)
    if inherited["mode"] == "vote" or not all(m.union_pass for m in modules):
        mode = "vote"  # a module folder's composition: merged where it was and still can be
    if (mode, calibration) != (inherited["mode"], inherited["calibration"]):
        say(f"the composition now runs with mode {mode}, calibration {calibration}: {why}")
    config = save_composition(modules, out, run.overwrite, {"made_from": [str(target)], "mode": mode,
                                                            "calibration": calibration,
                                                            "replaced": {"class": old.ref.qualified,
                                                                         "with": str(replacement)}})
    return {**_summary(config, Path(out), started), "replaced": old.ref.qualified, "with": new[0].ref.qualified,
            "mode": mode, "calibration": calibration}


def remove_dir(target: str | Path, cls: str, out: str | Path, run: Run | None = None) -> dict:
    """``cnnmod remove``: the composition without class ``cls``."""
    run = run or Run()
    started = time.perf_counter()
    check_output(Path(out), run.overwrite)
    modules = load_modules(target, pick_device(run.device))
    position = find_class([m.ref for m in modules], cls)
    if len(modules) == 1:
        raise UserError("that is the composition's only module; nothing would be left")
    removed = modules.pop(position)
    config = save_composition(modules, out, run.overwrite, {"made_from": [str(target)], **inherited_settings(target),
                                                            "removed": removed.ref.qualified})
    return {**_summary(config, Path(out), started), "removed": removed.ref.qualified}
