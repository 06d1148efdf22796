"""``cnnmod compose``, ``replace`` and ``remove`` as library calls (docs/method.md, "Composition" and
"Continuous learning"): module folders in (a decomposition or composition folder stands for all its modules), a
composition folder out, energy metered, a JSON result. No training."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifacts import check_output
from ..composition.base import find_class
from ..composition.voting import check_calibration, check_composable, check_mode
from ..errors import UserError
from ..io.store import (
    composition_setting,
    load_modules,
    save_composition,
    save_slim_composition,
    slim_source_dirs,
    slim_source_of,
)
from ..models.classifier import split_for
from ..models.folder import load_model
from ..modules.base import BinaryModule
from ..modules.kinds import kind_of
from ..progress import say
from ..recipes import chosen, composition_defaults, merging_overrides, merging_settings
from ..reuse import continuous_learning, fuse_slim, refit_composition
from ..runtime import pick_device
from ..slim.config import SlimSettings
from ..slim.merged import as_made, merge_slim
from .common import Run, seconds_since
from .evaluate import EvaluateSettings, evaluate_dir


@dataclass(frozen=True)
class ComposeSettings:
    """How ``cnnmod compose`` builds its classifier: continuous learning and refitted heads (node-level modules),
    how scores are compared (``calibration``) and run (``mode``; None: as :func:`cnnmod.recipes.composition_defaults`
    chooses for the modules), and, for a merged slim composition, how far it is pruned (``size``, ``max_loss``;
    ``pruning``: other :class:`SlimSettings` fields over :func:`cnnmod.recipes.merging_settings`)."""

    continuous_learning: bool = False
    refit_heads: bool = False
    calibration: str | None = None
    mode: str | None = None
    size: float | None = None
    max_loss: float | None = None
    pruning: dict = field(default_factory=dict)

    def resolved(self, modules: Sequence[BinaryModule]) -> tuple[ComposeSettings, str]:
        """The mode and calibration chosen where not given (:func:`cnnmod.recipes.composition_defaults`), and a
        line saying what was chosen and why ("" when both were given)."""
        mode, calibration, why = chosen(modules, self.mode, self.calibration,
                                        self.continuous_learning or self.refit_heads)
        if self.mode is not None and self.calibration is not None:
            return self, ""
        return replace(self, mode=mode, calibration=calibration), f"mode {mode}, calibration {calibration}: {why}"

    def check(self, modules: Sequence[BinaryModule]) -> None:
        """Everything that can be said against these settings for ``modules`` before any work starts."""
        check_composable(modules)
        prunes = bool(merging_overrides(self.size, self.max_loss, **self.pruning))
        slim = [m.ref.qualified for m in modules if not kind_of(m).refits]
        if (self.refit_heads or self.continuous_learning) and slim:
            what = "«refit_heads»" if self.refit_heads else "«continuous_learning»"
            raise UserError(f"{what} works on node-level modules; {slim[0]} is a slim module (its head was fitted "
                            "when it was made): compose node-level modules, or drop the option")
        if self.slim_network(modules) == "merged":
            self.slim().check()
            return
        if prunes:
            what = "«size»" if self.size is not None else "«max_loss»"
            raise UserError(f"{what} prunes a merged slim composition: compose slim modules of one model with "
                            "«mode» merged")
        if self.slim_network(modules) is None:
            check_mode(modules, self.mode)
            check_calibration(modules, self.calibration, self.mode)

    def slim_network(self, modules: Sequence[BinaryModule]) -> str | None:
        """The mode where the composition is a network of its own: every module's kind builds one in that mode
        (:class:`~cnnmod.modules.kinds.ModuleKind` ``networks``: slim modules, merged or fused)."""
        return self.mode if all(self.mode in kind_of(m).networks for m in modules) else None

    def slim(self) -> SlimSettings:
        """The merged network's own pruning."""
        return merging_settings(size=self.size, max_loss=self.max_loss, **self.pruning)


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
        network = s.slim_network(modules)
        made_from = {"made_from": [str(p) for p in paths]}
        if network == "merged":
            result = _merge_slim(paths, modules, out, s, run, dev)
        elif network == "fused":
            result = _fuse_slim(paths, modules, out, run, dev)
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


def _merge_slim(paths, modules: list, out: str | Path, s: ComposeSettings, run: Run, device) -> dict:
    """Slim modules of one decomposition merged into one network (the union of their kept channels), fitted to
    the composition's classes, pruned as ``s`` asks, saved."""
    source = slim_source_of(paths, device)
    train = split_for(source, None, run.data_root, "train")
    pruning = merging_overrides(s.size, s.max_loss, **s.pruning)
    merged = merge_slim(modules, source, train, as_made(modules, **pruning), batch_size=run.batch_size)
    save_slim_composition(merged, [source], out, run.overwrite, {"made_from": [str(p) for p in paths]})
    return {"out": str(out), "classes": merged.qualified_names, "mode": "merged", "granularity": "channel",
            "params_fraction": merged.metrics["params_fraction"],
            **{k: merged.metrics[k] for k in ("held_out_model_top1", "held_out_top1") if k in merged.metrics}}


def _fuse_slim(paths, modules: list, out: str | Path, run: Run, device) -> dict:
    """``compose --mode fused`` of slim ``modules``: :func:`cnnmod.reuse.fuse_slim`, grouped by model (in
    the order their modules come), saved."""
    folders = {d for p in paths for d in slim_source_dirs(p)}
    models = {m.info["weights_sha256"]: m for m in (load_model(f, device) for f in folders)}
    by_model: dict[str, list] = {}
    for m in modules:
        by_model.setdefault(m.source_sha, []).append(m)
    missing = [ms[0] for sha, ms in by_model.items() if sha not in models]
    if missing:
        raise UserError(f"the source model of {missing[0].ref.qualified} is not in its decomposition folder (its "
                        "weights differ): fuse modules with the folders they were decomposed into")
    groups = [(ms, models[sha]) for sha, ms in by_model.items()]
    fused = fuse_slim(groups, run.data_root, run.batch_size)
    sources = [source for _, source in groups]
    save_slim_composition(fused, sources, out, run.overwrite, {"made_from": [str(p) for p in paths]})
    total = sum(source.params() for source in sources)
    return {"out": str(out), "classes": fused.qualified_names, "mode": "fused", "granularity": "channel",
            "parts": len(sources), "params_fraction": round(fused.params() / total, 4)}


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
