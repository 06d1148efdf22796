"""The Python API in the command line's words: ``cnnmod.decompose`` makes modules of any registered kind with
the best measured settings unless told otherwise, ``cnnmod.compose`` composes any kind, choosing how to run and
compare them as the command line does (:func:`cnnmod.composition.build.mode_and_calibration`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from .composition.base import Composer
from .composition.build import Sources, build, mode_and_calibration
from .composition.evaluate import evaluate_against_model, evaluate_composition
from .data.dataset import ImageSet
from .data.torch_dataset import as_image_set
from .errors import UserError
from .models.classifier import Classifier, as_classifier, check_data, chosen_classes, test_set_for
from .modules.base import BinaryModule
from .modules.kinds import kind_named, kinds
from .recipes import settings_for
from .runtime import Clock, Passes


class Decomposition(list):
    """The modules :func:`decompose` made (a list; a slice of it is one too), with the ``model`` they were cut
    from and its training split ``data``: what :func:`compose` fits a merged network of slim modules from."""

    def __init__(self, modules, model: Classifier, data: ImageSet) -> None:
        super().__init__(modules)
        self.model, self.data = model, data

    def __getitem__(self, index):
        got = super().__getitem__(index)
        return Decomposition(got, self.model, self.data) if isinstance(index, slice) else got


def decompose(model: nn.Module, data, variant: str | None = None, *, granularity: str = "node",
              classes: list[int] | None = None, recipe: str | object | None = None,
              passes: Passes | None = None, **given) -> Decomposition:
    """One module per class of ``model`` (or per class in ``classes``), observed on ``data``, its training split
    (an :class:`~cnnmod.data.dataset.ImageSet` or a torch Dataset of (image, label) pairs).

    ``granularity``: a registered kind (:mod:`cnnmod.modules.kinds`): ``node`` (the paper's masks over the model)
    or ``channel`` (slim modules, physically smaller; ``size`` a fraction of the model's parameters, or
    ``max_loss`` in pp). ``recipe``: best (the default), paper, cheap or small (:mod:`cnnmod.recipes`), or the
    kind's settings themselves (a :class:`~cnnmod.node.DecomposeSettings` or :class:`~cnnmod.slim.SlimSettings`);
    fields of the recipe given as keywords override it (``step=0.3``). ``calibration_samples`` (default 100)
    held-out inputs per class fit each module's score calibration (0: none)."""
    kind = kind_named(granularity)
    if variant is not None:
        given["variant"] = variant
    samples = given.pop("calibration_samples", None)
    data = as_image_set(data)
    clf = as_classifier(model, data)
    check_data(clf, data)
    passes = passes or Passes()
    if passes.device is not None:
        clf = clf.to(passes.device)
    picked = chosen_classes(clf, classes)
    every = len(picked) == clf.num_classes
    if isinstance(recipe, kind.settings):
        unknown = [k for k in given if k not in recipe.__dataclass_fields__]
        if unknown:
            raise UserError(f"{unknown[0]!r} is not a setting of {kind.what}")
        settings = replace(recipe, **given)
    elif recipe is not None and not isinstance(recipe, str):
        owner = next((k for k in kinds().values() if isinstance(recipe, k.settings)), None)
        raise UserError(f"«recipe» {type(recipe).__name__} makes "
                        f"{owner.what if owner else 'no modules cnnmod knows'}: give «granularity» "
                        f"{owner.name if owner else granularity} or settings of {kind.what}")
    else:
        settings = settings_for(kind, recipe, every_class=every, **given)
    settings.check()
    kind.check(settings, picked, clf.num_classes, passes.dd.world)
    modules = kind.decompose(clf, data, settings, picked, passes, Clock(), samples)
    return Decomposition(modules, clf, data)


def compose(modules: Sequence[BinaryModule], mode: str | None = None, calibration: str | None = None, *,
            model: Classifier | None = None, data: ImageSet | None = None, **pruning) -> Composer:
    """A classifier over ``modules``' classes: uint8 images (B, C, H, W) -> scores p_c (B, K).

    ``mode`` and ``calibration`` default as the command line's
    (:func:`cnnmod.composition.build.mode_and_calibration`: one model's modules run merged, in one pass; modules of
    several models vote, their scores calibrated). A merged network of slim modules is fitted on their source
    ``model``'s training split ``data``: given, or those of the :class:`Decomposition` that :func:`decompose`
    returned (``data`` default: the model's own data set by name); without their model slim modules vote.
    ``size`` or ``max_loss`` prune that network further for its
    classes."""
    if not len(modules):
        raise UserError("nothing to compose: give at least one module")
    if model is not None:
        sources = Sources.of(model, None if data is None else as_image_set(data))
    elif isinstance(modules, Decomposition):
        sources = Sources.of(modules.model, modules.data)
    else:
        sources = Sources()
    modules = list(modules)
    mode, calibration, _ = mode_and_calibration(modules, mode, calibration, networks=sources.has(modules))
    return build(modules, mode, calibration, sources, **pruning)


def evaluate(composer: Composer, test=None, *, model: Classifier | None = None, batch_size: int = 512) -> dict:
    """``composer`` on test images: with its source ``model``, both on ``test`` (default: the model's own test
    split; the model's whole test split is restricted to the composer's classes, else its labels are the
    composer's columns) (top-1, top-5, per class, the binary report of every column);
    without, each class on its own data set's test split, by name. As ``cnnmod evaluate`` reports them."""
    device = next(composer.parameters()).device
    if model is None:
        if test is not None:
            raise UserError("evaluating on given «data» needs the modules' source model: evaluate(composer, data, "
                            "model=model)")
        return evaluate_composition(composer, None, device, batch_size)
    classes = [r.index for r in composer.refs]
    if test is None:
        test = test_set_for(model, None, None)
    test = as_image_set(test)
    if test.num_classes == model.num_classes and test.num_classes != len(classes):  # the model's whole test split
        test = test.subset(classes)
    return evaluate_against_model(composer, model, test, device, batch_size)
