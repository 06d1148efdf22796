"""Reuse beyond voting as it is: continuous learning (modules relearn the other data sets' classes, as their kind
relearns), heads and calibrations refitted on a composition's classes. No network weight is trained
(docs/method.md, "Continuous learning", "Refitted heads", "Calibrated scores").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .composition.build import Sources
from .composition.fitting import calibrate_modules, fitted_on, refit_heads
from .data.dataset import ImageSet
from .errors import UserError
from .modules.base import BinaryModule
from .modules.kinds import kind_of
from .progress import progress_bar


def continuous_learning(modules: Sequence[BinaryModule], data_root: str | None = None,
                        device: torch.device | None = None,
                        batch_size: int = 256, refit: bool = False) -> list[BinaryModule]:
    """Each module relearns the composition's classes from data sets other than its own (docs/method.md,
    "Continuous learning"),
    and its score calibration is refitted on them; with ``refit`` (beyond the paper) its two-way head too."""
    sets = Sources(data_root=data_root).class_sets(modules)
    if len(sets) < 2:
        raise UserError("continuous learning needs modules from at least two data sets; all of these come from "
                        f"{next(iter(sets))}")
    out = []
    with progress_bar("continuous learning", len(modules)) as step:
        for m in modules:
            learned = m
            for name, data in sets.items():
                if name != m.ref.dataset:
                    learned = kind_of(learned).relearn(learned, data, device=device, batch_size=batch_size)
            out.append(learned)
            step()
    return _fit_to(out, sets, refit, batch_size)


def refit_composition(modules: Sequence[BinaryModule], data_root: str | None = None,
                      batch_size: int = 256) -> list[BinaryModule]:
    """Beyond the paper: every module's head refitted on the composition's classes (:func:`refit_heads_on`),
    then its calibration (:func:`recalibrate`); for modules of one data set or several, with no relearning."""
    return _fit_to(modules, Sources(data_root=data_root).class_sets(modules), True, batch_size)


def _fit_to(modules: Sequence[BinaryModule], sets: dict[str, ImageSet], refit: bool,
            batch_size: int) -> list[BinaryModule]:
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


def refit_heads_on(modules: Sequence[BinaryModule], sets: dict[str, ImageSet],
                   batch_size: int = 256) -> list[BinaryModule]:
    """Every module's head refitted (:func:`cnnmod.composition.fitting.refit_heads`) on as many inputs per class of the
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
    its own data set; this is the same fit (docs/method.md, "Calibrated scores"), with as many inputs per class and the
    same seed as the module was made with, on the classes it now competes with. No weight of any network
    changes."""
    for (per_class, seed), where in _by_making(modules, lambda m: (m.calibration or {}).get("per_class", 100)).items():
        calibrate_modules([modules[i] for i in where], sets, per_class, seed, batch_size)
    classes = fitted_on(sets)
    for m in modules:
        m.calibration["fitted_on"] = classes
