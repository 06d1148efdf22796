"""One composition of modules in any mode: voting (every kind), or what the modules' kind builds in that mode
(:class:`~cnnmod.modules.kinds.Composing`, asked of the table of kinds). What a composition that is a network of
its own is fitted from, its source models and their training data, is passed explicitly (:class:`Sources`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data import load
from ..data.dataset import ImageSet
from ..errors import UserError
from ..models.classifier import Classifier, split_for
from ..modules.base import BinaryModule
from ..modules.kinds import Composing, composing_of, kind_of, kinds, modes
from .base import Composer
from .voting import Composition


@dataclass
class Sources:
    """The source models a composition may be fitted from, by their weights' sha256 (what each module records
    as ``source_sha``), and the training split of each where given (else the model's own data set's, loaded by
    name from ``data_root``); ``batch_size`` of the passes that fit it."""

    models: dict[str | None, Classifier] = field(default_factory=dict)
    data: dict[str | None, ImageSet] = field(default_factory=dict)
    data_root: str | None = None
    batch_size: int = 256

    @classmethod
    def of(cls, model: Classifier, data: ImageSet | None = None, batch_size: int = 256) -> Sources:
        """One model (and the training split it was decomposed on, where given)."""
        sha = model.info.get("weights_sha256")
        return cls({sha: model}, {} if data is None else {sha: data}, batch_size=batch_size)

    def has(self, modules: Sequence[BinaryModule]) -> bool:
        """Whether the source model of every module is here."""
        return all(m.source_sha in self.models for m in modules)

    def model_for(self, module: BinaryModule, why: str) -> Classifier:
        if module.source_sha not in self.models:
            raise UserError(f"{why} needs the model {module.ref.qualified} was cut from: compose the modules with "
                            "the decomposition folder they were saved in (cnnmod decompose writes the model there), "
                            "or in Python give it: cnnmod.compose(modules, model=model)")
        return self.models[module.source_sha]

    def training_split(self, model: Classifier) -> ImageSet:
        sha = model.info.get("weights_sha256")
        return self.data[sha] if sha in self.data else split_for(model, None, self.data_root, "train")

    def class_sets(self, modules: Sequence[BinaryModule]) -> dict[str, ImageSet]:
        """The training split of every data set of ``modules``, restricted to their classes (in module order)."""
        by_dataset: dict[str, list[int]] = {}
        for m in modules:
            by_dataset.setdefault(m.ref.dataset, [])
            if m.source_class not in by_dataset[m.ref.dataset]:
                by_dataset[m.ref.dataset].append(m.source_class)
        return {name: load(name, "train", self.data_root, classes) for name, classes in by_dataset.items()}


def build(modules: Sequence[BinaryModule], mode: str = "vote", calibration: str = "none",
          sources: Sources | None = None, **pruning) -> Composer:
    """``modules`` composed in ``mode``: ``vote`` (:class:`Composition`), else what their kind builds in that mode,
    fitted from ``sources`` where it is a network of its own; ``pruning``: its own pruning, where it takes one
    (``size``, ``max_loss``, ...)."""
    modules = list(modules)
    composing = composing_for(modules, mode, pruning)
    if composing is None:
        return Composition(modules, calibration=calibration, mode=mode)
    return composing.build(modules, sources or Sources(), calibration, **pruning)


def composing_for(modules: Sequence[BinaryModule], mode: str, pruning: dict | None = None) -> Composing | None:
    """What builds ``modules`` in ``mode`` (None: voting), refused in one line where nothing does, or where
    ``pruning`` is asked of a composition without a pruning of its own."""
    composing = composing_of(modules, mode) if mode != "vote" else None
    if mode != "vote" and composing is None:
        if mode not in modes():
            raise UserError(f"unknown composition mode {mode!r}; choose {', '.join(modes())}")
        makers = [k.what for k in kinds().values() if k.composing(mode) is not None]
        these = sorted({kind_of(m).what for m in modules})
        raise UserError(f"«mode» {mode} composes {' or '.join(makers)}, each kind alone; these are "
                        f"{' and '.join(these)}: compose them with «mode» vote")
    if pruning and not (composing is not None and composing.prunes):
        raise UserError(f"«{next(iter(pruning))}» prunes a merged slim composition: compose slim modules of one "
                        "model with «mode» merged")
    return composing


def composition_defaults(modules: Sequence[BinaryModule], networks: bool = True) -> tuple[str, str, str]:
    """How a composition of ``modules`` runs and compares their scores when the user does not say: (mode,
    calibration, why). One model's modules run merged, one pass (as their kind merges them: slim ones as one
    network, node-level ones on the union of their nodes; without ``networks``, only where that needs no source
    model); their scores come from one model and are compared as they are. Modules of several models vote, each
    score Platt-calibrated; of several data sets, Platt times each module's in-distribution test (``platt-ood``).
    Where the modules lack what a calibration needs, the next best that they have."""
    sources = {m.source_key if m.source_model is not None else m.source_sha for m in modules}
    datasets = {m.ref.dataset for m in modules}
    if len(sources) == 1:
        merged = composing_of(modules, "merged")
        if merged is not None and (networks or not merged.network):
            return "merged", "none", "the modules of one model run as one network, in one pass"
        return "vote", "none", "the modules of one model compared as they are"
    if len(datasets) > 1 and all(m.calibration and m.typical is not None for m in modules):
        return "vote", "platt-ood", "modules of several data sets: Platt, times each in-distribution test"
    if all(m.calibration for m in modules):
        return "vote", "platt", "modules of several models: Platt-calibrated scores"
    return "vote", "none", "modules of several models, some without calibration: scores compared as they are"


def mode_and_calibration(modules: Sequence[BinaryModule], mode: str | None, calibration: str | None,
                         refitted: bool = False, networks: bool = True) -> tuple[str, str, str]:
    """The mode and calibration a composition of ``modules`` runs with: as given, the rest chosen to fit
    (:func:`composition_defaults`). Platt times the in-distribution test needs voting (each module's own
    activations), so a calibration of platt-ood given alone votes, and a mode given alone drops it to platt;
    a composition that is a network of its own compares no calibrated scores; modules refitted on the
    composition's classes (continuous learning, refitted heads) vote, Platt-calibrated where they can be. The
    third value says why, in words."""
    default_mode, default_calibration, why = composition_defaults(modules, networks)
    if refitted:
        default_mode = "vote"
        default_calibration = "platt" if all(m.calibration for m in modules) else "none"
        why = "modules refitted on the composition's classes, their calibrations with them"
    if mode is None:
        mode = "vote" if calibration not in (None, "none") and (calibration == "platt-ood" or not all(
            m.union_pass for m in modules)) else default_mode
    if calibration is None:
        calibration = default_calibration
        if mode != "vote":
            composing = composing_of(modules, mode)
            network = composing is not None and composing.network
            calibration = "none" if network else ("platt" if calibration == "platt-ood" else calibration)
    if mode != default_mode:
        why = f"mode {mode} as asked"
    return mode, calibration, why
