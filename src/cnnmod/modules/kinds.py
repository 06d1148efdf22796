"""The table of module kinds: how each kind of :class:`~cnnmod.modules.base.BinaryModule` is written to and read
from its folder, and what it can be composed into. A kind registers itself from its own package
(:mod:`cnnmod.node`, :mod:`cnnmod.slim`); the store, the jobs and the command line ask this table, never a module's
type. A new kind is one subpackage and one :func:`register_module_kind`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .base import BinaryModule


@dataclass(frozen=True)
class ModuleKind:
    """One kind of module: its name on disk (a module folder's ``granularity``), how it is written (``write(folder,
    module, source_path, source_sha)`` -> its config) and read (``load(folder, config, tensors, device, sources)``),
    which composition modes build a network of its own from modules of the kind (``networks``, e.g. a merged slim
    network), and whether its heads can be refitted and its nodes relearn other data sets' classes
    (``refits``)."""

    name: str
    write: Callable[[Path, BinaryModule, str | None, str | None], dict]
    load: Callable[..., BinaryModule]
    networks: tuple[str, ...] = ()
    refits: bool = False


MODULE_KINDS: dict[str, ModuleKind] = {}


def register_module_kind(kind: ModuleKind) -> ModuleKind:
    """Make a kind of module known to the store, the jobs and the command line by its ``name``."""
    MODULE_KINDS[kind.name] = kind
    return kind


def kind_of(module: BinaryModule) -> ModuleKind:
    return MODULE_KINDS[module.granularity]


def kind_named(name: str, where: object) -> ModuleKind:
    """The kind a folder's config names, or one line saying this cnnmod does not know it."""
    if name not in MODULE_KINDS:
        raise UserError(f"{where} is a module of kind {name!r}, which this cnnmod does not know: upgrade cnnmod")
    return MODULE_KINDS[name]


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
