"""The table of module kinds: what each kind of :class:`~cnnmod.modules.base.BinaryModule` is made with (its
settings type and recipes), how it is made (``decompose``), what it composes into besides voting, how it is
relearned, and how it is written to and read from its folder. A kind registers itself from its own package
(:mod:`cnnmod.node`, :mod:`cnnmod.slim`); the API, the jobs, the store and the command line ask this table,
never a module's type or a kind's name. A new kind is one subpackage and one :func:`register_module_kind`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import BinaryModule


@dataclass(frozen=True)
class Composing:
    """A composition a kind builds from its modules besides voting, under its own ``name`` (``union-pass``,
    ``merged-network``, ...), asked for by the user as ``mode`` (``merged``, ``fused``).

    ``build(modules, sources, calibration, **pruning)`` -> the :class:`~cnnmod.composition.base.Composer`;
    ``sources``: a :class:`~cnnmod.composition.build.Sources` (the source models and their training data).
    ``network``: the composition is a network of its own, fitted from its source models (saved by the
    composition kind of the same name, :data:`~cnnmod.composition.base.COMPOSER_KINDS`; it compares no
    calibrated scores); else it runs the modules themselves and is saved as their folders. ``prunes``: it takes
    ``size``/``max_loss`` and the other fields of its own pruning."""

    name: str
    mode: str
    build: Callable[..., Any]
    network: bool = False
    prunes: bool = False


@dataclass(frozen=True)
class ModuleKind:
    """One kind of module.

    - Its name (``--granularity``; a module folder's ``granularity``), ``what`` its modules are called in
      words (``slim modules``), its ``settings`` type (a frozen dataclass,
      checked by its ``check()``) and its ``recipes``: ``recipe(name, every_class=, one_process=, **fields)`` ->
      settings, for the recipe ``names`` it makes (None: its best).
    - ``decompose(model, data, settings, classes, passes, clock, calibration_samples)`` -> its modules of
      ``classes``, calibrated (``calibration_samples`` None: the kind's default), timed on ``clock``
      (:class:`~cnnmod.runtime.Clock`: ``decomposition`` and ``calibration``). ``fits(model)``: None where the
      kind can decompose the model, else the error saying why not (the default kind is the first in the table
      that fits). ``check(settings, classes, num_classes, processes)`` refuses, before any work, what the
      settings cannot do in this run. ``spreads``: its modules are made one by one, so torchrun spreads classes
      over processes; else the decomposition shares its passes over data among them. ``describe(model,
      settings, data, processes)``: the line said before making.
    - ``compositions``: what it composes into besides voting (:class:`Composing`); ``relearn(module, data,
      device, batch_size)``: continuous learning of other data sets' classes (None: it cannot); ``refits``:
      its heads can be refitted on a composition's classes.
    - ``write(folder, module, source_path, source_sha)`` -> its config, ``load(folder, config, tensors, device,
      sources)`` -> the module."""

    name: str
    what: str
    settings: type
    recipe: Callable[..., Any]
    names: tuple[str, ...]
    decompose: Callable[..., list[BinaryModule]]
    describe: Callable[..., str]
    write: Callable[[Path, BinaryModule, str | None, str | None], dict]
    load: Callable[..., BinaryModule]
    fits: Callable[[Any], UserError | None] = lambda model: None
    check: Callable[..., None] = lambda settings, classes, num_classes, processes: None
    spreads: bool = False
    compositions: tuple[Composing, ...] = ()
    relearn: Callable[..., BinaryModule] | None = None
    refits: bool = False

    def composing(self, mode: str) -> Composing | None:
        """What it builds in ``mode`` (None: nothing of its own; voting is every kind's)."""
        return next((c for c in self.compositions if c.mode == mode), None)


MODULE_KINDS: dict[str, ModuleKind] = {}
# the packages of the kinds cnnmod comes with and the kinds they register, imported (and so registered) the first
# time the table is read, and first in it in this order (the default kind is the first that fits a model); a
# kind of the user's own registers itself when its package is imported, and comes after them
BUILT_IN = {"cnnmod.node": "node", "cnnmod.slim": "channel"}


def register_module_kind(kind: ModuleKind) -> ModuleKind:
    """Make a kind of module known to the API, the jobs, the store and the command line by its ``name``."""
    MODULE_KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, ModuleKind]:
    """Every registered kind, by name, in the order registered (the built-in ones first)."""
    for package in BUILT_IN:
        if package not in sys.modules:
            importlib.import_module(package)
    built_in = [n for n in BUILT_IN.values() if n in MODULE_KINDS]
    if list(MODULE_KINDS)[:len(built_in)] != built_in:  # registered in another order: the built-in ones first
        ordered = {n: MODULE_KINDS[n] for n in built_in} | MODULE_KINDS
        MODULE_KINDS.clear()
        MODULE_KINDS.update(ordered)
    return MODULE_KINDS


def kind_of(module: BinaryModule) -> ModuleKind:
    return kinds()[module.granularity]


def kind_named(name: str, where: object = None) -> ModuleKind:
    """The kind of that name; one line saying which there are (or, for a folder, that this cnnmod does not know
    it)."""
    if name not in kinds():
        if where is not None:
            raise UserError(f"{where} is a module of kind {name!r}, which this cnnmod does not know: upgrade cnnmod")
        raise UserError(f"unknown granularity {name!r}; use {' or '.join(MODULE_KINDS)}")
    return MODULE_KINDS[name]


def composing_of(modules, mode: str) -> Composing | None:
    """What ``modules`` build together in ``mode``: the one :class:`Composing` their kinds share for it (None
    when they share none: voting, or a mode their kinds do not build together)."""
    found = {id(c): c for c in (kind_of(m).composing(mode) for m in modules)}
    return next(iter(found.values())) if len(found) == 1 and None not in found.values() else None


def modes() -> tuple[str, ...]:
    """Every composition mode: voting, and each one a registered kind builds."""
    return ("vote", *dict.fromkeys(c.mode for k in kinds().values() for c in k.compositions))


def typical_tensors(m: BinaryModule) -> dict[str, torch.Tensor]:
    """A module's in-distribution test as ``typical.*`` tensors (none when it has no test)."""
    return {f"typical.{k}": v for k, v in (m.typical or {}).items()}


def typical_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The in-distribution test stored among a module's tensors (None when it has none)."""
    return {k[len("typical."):]: v for k, v in tensors.items() if k.startswith("typical.")} or None


def detector_lines(metrics: dict) -> list[str]:
    """A module card's lines on the module alone as a detector of its class (as ``cnnmod decompose`` measured it:
    :func:`cnnmod.jobs.decompose.measure_modules`); none where it was not measured."""
    if metrics.get("balanced_accuracy") is None:
        return []
    how = "its calibrated probability" if metrics.get("calibrated") else "its score"
    lines = [f"- alone, as a detector of its class ({how} over 0.5, on the test images of the decomposed classes): "
             f"balanced accuracy {metrics['balanced_accuracy']:.2f} % (true positives "
             f"{metrics.get('true_positive_rate', 0):.2f} %, true negatives "
             f"{metrics.get('true_negative_rate', 0):.2f} %)"]
    if metrics.get("model_balanced_accuracy") is not None:
        lines.append(f"- the source model's own one-vs-rest decision on the same images: balanced accuracy "
                     f"{metrics['model_balanced_accuracy']:.2f} %")
    return lines
