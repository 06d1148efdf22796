"""Reuse, replace and remove (METHOD.md sections 6-7): new classifiers from existing modules, no training.

Every operation reads module folders (a decomposition or composition folder stands for all its modules) and
writes a composition folder (see ``store.save_composition``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .artifacts import check_output
from .classifier import Classifier, load_model
from .compose import base_dataset, check_calibration, check_composable, check_mode, class_key, qualified_name
from .data import load
from .data.dataset import ImageSet
from .decompose import calibrate_modules, fitted_on, refit_heads, relearn
from .errors import UserError
from .module import Module
from .progress import progress_bar
from .runtime import pick_device
from .slim import FusedSlim, SlimModule, merge_slim
from .store import (
    composition_setting,
    load_modules,
    save_composition,
    save_fused_slim,
    save_merged_slim,
    slim_source_dir,
    slim_source_of,
)


def find_class(modules: Sequence[Module], text: str) -> int:
    """The position of the module a ``--class`` names: ``dataset:name``, ``dataset:index``, a class name, or an
    index of the data set's classes."""
    text = text.strip()
    dataset, sep, rest = text.rpartition(":")
    candidates = []
    for i, m in enumerate(modules):
        if sep and dataset != base_dataset(m):
            continue
        what = rest if sep else text
        if what == m.class_name or (what.isdigit() and int(what) == m.source_class):
            candidates.append(i)
    names = ", ".join(qualified_name(m) for m in modules)
    if not candidates:
        raise UserError(f"the composition has no class {text!r}; its classes are {names}")
    if len(candidates) > 1:
        raise UserError(f"--class {text!r} matches {len(candidates)} modules; say which with dataset:class "
                        f"(one of {', '.join(qualified_name(modules[i]) for i in candidates)})")
    return candidates[0]


def composition_sets(modules: Sequence[Module], data_root: str | None = None) -> dict[str, ImageSet]:
    """The training split of every data set of a composition's modules, restricted to the composition's classes."""
    by_dataset: dict[str, list[int]] = {}
    for m in modules:
        by_dataset.setdefault(base_dataset(m), [])
        if m.source_class not in by_dataset[base_dataset(m)]:
            by_dataset[base_dataset(m)].append(m.source_class)
    return {name: load(name, "train", data_root, classes) for name, classes in by_dataset.items()}


def continuous_learning(modules: Sequence[Module], data_root: str | None = None, device: torch.device | None = None,
                        batch_size: int = 256, refit: bool = False) -> list[Module]:
    """Each module relearns the composition's classes from data sets other than its own (METHOD.md section 7),
    and its score calibration is refitted on them; with ``refit`` (beyond the paper) its two-way head too."""
    sets = composition_sets(modules, data_root)
    if len(sets) < 2:
        raise UserError("continuous learning needs modules from at least two data sets; all of these come from "
                        f"{next(iter(sets))}")
    out = []
    with progress_bar("continuous learning", len(modules)) as step:
        for m in modules:
            learned = m
            for name, data in sets.items():
                if name != base_dataset(m):
                    learned = relearn(learned, data, device=device, batch_size=batch_size)
            out.append(learned)
            step()
    return _fit_to(out, sets, refit, batch_size)


def refit_composition(modules: Sequence[Module], data_root: str | None = None, batch_size: int = 256) -> list[Module]:
    """Beyond the paper: every module's head refitted on the composition's classes (:func:`refit_heads_on`),
    then its calibration (:func:`recalibrate`); for modules of one data set or several, with no relearning."""
    return _fit_to(modules, composition_sets(modules, data_root), True, batch_size)


def _fit_to(modules: Sequence[Module], sets: dict[str, ImageSet], refit: bool, batch_size: int) -> list[Module]:
    """The modules' heads refitted on ``sets`` when asked, then their calibrations."""
    out = refit_heads_on(modules, sets, batch_size) if refit else list(modules)
    recalibrate(out, sets, batch_size=batch_size)
    return out


def _by_making(modules: Sequence, per_class) -> dict[tuple[int, int], list[int]]:
    """Positions of the modules grouped by (inputs per class, seed) as they were made with."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault((per_class(m), m.settings.get("seed", 0)), []).append(i)
    return groups


def refit_heads_on(modules: Sequence[Module], sets: dict[str, ImageSet], batch_size: int = 256) -> list[Module]:
    """Every module's head refitted (:func:`cnnmod.decompose.refit_heads`) on as many inputs per class of the
    composition's classes as the module was observed on, in the same seeded order."""
    out = list(modules)
    observed = _by_making(modules, lambda m: int(m.settings.get("observed", m.settings.get("ci_samples", 1000))))
    for (per_class, seed), where in observed.items():
        fitted = refit_heads([modules[i] for i in where], sets, per_class, seed, batch_size)
        for i, m in zip(where, fitted, strict=True):
            out[i] = m
    return out


def recalibrate(modules: Sequence, sets: dict[str, ImageSet], batch_size: int = 256) -> None:
    """Refit every module's score calibration on held-out training inputs of the composition's own classes,
    from every data set they come from (``sets``: data set name -> its training split, restricted to the
    composition's classes). A module of one data set never saw the others' images: calibrated on its own data
    set only, it can be confidently wrong on them. Fitted at decomposition, a module's calibration knew only
    its own data set; this is the same fit (METHOD.md, calibrated scores), with as many inputs per class and the
    same seed as the module was made with, on the classes it now competes with. No weight of any network
    changes."""
    for (per_class, seed), where in _by_making(modules, lambda m: (m.calibration or {}).get("per_class", 100)).items():
        calibrate_modules([modules[i] for i in where], sets, per_class, seed, batch_size)
    classes = fitted_on(sets)
    for m in modules:
        m.calibration["fitted_on"] = classes


def _summary(config: dict, out: Path, started: float) -> dict:
    return {"out": str(out), "classes": [e["name"] for e in config["classes"]], "sources": config["sources"],
            "kept_fraction_mean": round(sum(e["kept_fraction"] for e in config["classes"]) / len(config["classes"]), 6),
            "seconds": round(time.perf_counter() - started, 3)}


def compose_dirs(paths: Sequence[str | Path], out: str | Path, relearn_foreign: bool = False,
                 data_root: str | None = None, device: str = "auto", batch_size: int = 256,
                 overwrite: bool = False, calibration: str = "none", mode: str = "vote",
                 refit_heads: bool = False, size: float | None = None, cost: str | None = None,
                 multiple: int = 1, max_loss: float | None = None) -> dict:
    """``cnnmod compose``: the modules of ``paths`` as one composition folder."""
    started = time.perf_counter()
    check_output(Path(out), overwrite)
    dev = pick_device(device)
    modules = load_modules(paths, dev)
    check_composable(modules)
    if (cost is not None or multiple != 1) and size is None and max_loss is None:
        what = "--slim-cost" if cost is not None else "--slim-multiple"
        raise UserError(f"{what} shapes how --size prunes a merged slim composition: give --size too, or drop it")
    cost = cost or "params"
    slim = [qualified_name(m) for m in modules if isinstance(m, SlimModule)]
    if (refit_heads or relearn_foreign) and slim:
        what = "--refit-heads" if refit_heads else "--continuous-learning"
        raise UserError(f"{what} works on node-level modules; {slim[0]} is a slim module (its head was fitted "
                        "when it was made): compose node-level modules, or drop the option")
    if mode == "merged" and slim and len(slim) == len(modules):
        return merge_slim_dirs(paths, modules, out, data_root, dev, batch_size, overwrite, started, size, cost,
                               multiple, max_loss)
    if size is not None or max_loss is not None:
        what = "--size" if size is not None else "--max-loss"
        raise UserError(f"{what} prunes a merged slim composition: compose slim modules of one model with "
                        "--mode merged")
    if mode == "fused" and slim and len(slim) == len(modules):
        return fuse_slim_dirs(paths, modules, out, data_root, dev, batch_size, overwrite, started)
    check_mode(modules, mode)
    check_calibration(modules, calibration, mode)
    if relearn_foreign:
        modules = continuous_learning(modules, data_root, dev, batch_size, refit=refit_heads)
    elif refit_heads:
        modules = refit_composition(modules, data_root, batch_size)
    config = save_composition(modules, out, overwrite, {"continuous_learning": relearn_foreign,
                                                        "refit_heads": refit_heads,
                                                        "calibration": calibration, "mode": mode,
                                                        "made_from": [str(p) for p in paths]})
    return {**_summary(config, Path(out), started), "calibration": calibration, "mode": mode}


def merge_slim_dirs(paths, modules: list, out: str | Path, data_root: str | None, device, batch_size: int,
                    overwrite: bool, started: float, size: float | None = None, cost: str = "params",
                    multiple: int = 1, max_loss: float | None = None) -> dict:
    """Slim modules of one decomposition merged into one network (the union of their kept channels), fitted
    to the composition's classes; with ``size``, pruned further to that fraction of the model's parameters;
    with ``max_loss``, as far as its held-out top-1 among its classes stays within that many points of the
    model's restricted to them."""
    from .evaluation import split_for

    source = slim_source_of(paths, device)
    train = split_for(source, None, data_root, "train")
    made = modules[0].settings  # observed as the modules were: as many inputs, the same objective
    merged = merge_slim(modules, source, train, samples=made.get("samples", 256), seed=made.get("seed", 0),
                        batch_size=batch_size, objective=made.get("objective", "labels"), size=size, cost=cost,
                        multiple=multiple, max_loss=max_loss)
    save_merged_slim(merged, source, out, overwrite, {"made_from": [str(p) for p in paths]})
    return {"out": str(out), "classes": merged.qualified_names, "mode": "merged", "granularity": "channel",
            "params_fraction": merged.metrics["params_fraction"],
            **{k: merged.metrics[k] for k in ("held_out_model_top1", "held_out_top1") if k in merged.metrics},
            "seconds": round(time.perf_counter() - started, 3)}


def fuse_slim(groups: list[tuple[list[SlimModule], Classifier]], data_root: str | None = None,
              batch_size: int = 256) -> FusedSlim:
    """Slim modules of several models (``groups``: each model's modules and the model): each model's merged into
    one network (:func:`merge_slim`, observed as its modules were) whose head rows are also fitted on the other
    models' classes (their training images, as inputs of none of its classes), run side by side."""
    from .evaluation import split_for

    parts = []
    with progress_bar("fusing", len(groups)) as step:
        for i, (modules, source) in enumerate(groups):
            others = [m for j, (ms, _) in enumerate(groups) if j != i for m in ms]
            made = modules[0].settings
            parts.append(merge_slim(modules, source, split_for(source, None, data_root, "train"),
                                    samples=made.get("samples", 256), seed=made.get("seed", 0), batch_size=batch_size,
                                    objective=made.get("objective", "labels"),
                                    foreign=list(composition_sets(others, data_root).values())))
            step()
    return FusedSlim(parts)


def fuse_slim_dirs(paths, modules: list, out: str | Path, data_root: str | None, device, batch_size: int,
                   overwrite: bool, started: float) -> dict:
    """``compose --mode fused`` of the slim ``modules`` at ``paths``: :func:`fuse_slim`, grouped by model (in the
    order their modules come), saved."""
    models = {m.info["weights_sha256"]: m for m in (load_model(f, device) for f in {slim_source_dir(p) for p in paths})}
    by_model: dict[str, list] = {}
    for m in modules:
        by_model.setdefault(m.source_info["weights_sha256"], []).append(m)
    missing = [ms[0] for sha, ms in by_model.items() if sha not in models]
    if missing:
        raise UserError(f"the source model of {qualified_name(missing[0])} is not in its decomposition folder (its "
                        "weights differ): fuse modules with the folders they were decomposed into")
    groups = [(ms, models[sha]) for sha, ms in by_model.items()]
    fused = fuse_slim(groups, data_root, batch_size)
    sources = [source for _, source in groups]
    save_fused_slim(fused, sources, out, overwrite, {"made_from": [str(p) for p in paths]})
    total = sum(sum(p.numel() for p in s.net.parameters()) for s in sources)
    return {"out": str(out), "classes": fused.qualified_names, "mode": "fused", "granularity": "channel",
            "parts": len(fused.parts), "params_fraction": round(fused.params() / total, 4),
            "seconds": round(time.perf_counter() - started, 3)}


def inherited_settings(target: str | Path) -> dict:
    """What a composition made from ``target`` keeps of it: how its scores are compared and run."""
    return {"calibration": composition_setting([target], "calibration", "none"),
            "mode": composition_setting([target], "mode", "vote")}


def replace_dir(target: str | Path, cls: str, replacement: str | Path, out: str | Path,
                overwrite: bool = False, device: str = "auto") -> dict:
    """``cnnmod replace``: the module of class ``cls`` swapped for the one module at ``replacement``."""
    started = time.perf_counter()
    check_output(Path(out), overwrite)
    dev = pick_device(device)
    modules = load_modules(target, dev)
    position = find_class(modules, cls)
    new = load_modules(replacement, dev)
    if len(new) != 1:
        raise UserError(f"--with must be one module folder; {replacement} holds {len(new)} modules (pick one of its "
                        "modules/ folders)")
    old = modules[position]
    modules[position] = new[0]
    others = [class_key(m) for i, m in enumerate(modules) if i != position]
    if class_key(new[0]) in others:
        raise UserError(f"the composition has class {qualified_name(new[0])} already; replace that class instead")
    config = save_composition(modules, out, overwrite, {"made_from": [str(target)],
                                                        **inherited_settings(target),
                                                        "replaced": {"class": qualified_name(old),
                                                                     "with": str(replacement)}})
    return {**_summary(config, Path(out), started), "replaced": qualified_name(old),
            "with": qualified_name(new[0])}


def remove_dir(target: str | Path, cls: str, out: str | Path, overwrite: bool = False, device: str = "auto") -> dict:
    """``cnnmod remove``: the composition without class ``cls``."""
    started = time.perf_counter()
    check_output(Path(out), overwrite)
    modules = load_modules(target, pick_device(device))
    position = find_class(modules, cls)
    if len(modules) == 1:
        raise UserError("that is the composition's only module; nothing would be left")
    removed = modules.pop(position)
    config = save_composition(modules, out, overwrite, {"made_from": [str(target)],
                                                        **inherited_settings(target),
                                                        "removed": qualified_name(removed)})
    return {**_summary(config, Path(out), started), "removed": qualified_name(removed)}
