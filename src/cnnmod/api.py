"""The Python API in the command line's words: ``cnnmod.decompose`` makes either kind of module with the best
measured settings unless told otherwise, ``cnnmod.compose`` composes any kind, choosing how to run and compare
them as the command line does (:mod:`cnnmod.recipes`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from .composition.base import Composer
from .composition.evaluate import evaluate_against_model, evaluate_composition
from .composition.fitting import calibrate_decomposition
from .composition.voting import Composition
from .composition.voting import compose as compose_modules
from .data.dataset import ImageSet
from .data.torch_dataset import as_image_set
from .errors import UserError
from .models.classifier import Classifier, split_for, test_set_for
from .modules.base import BinaryModule
from .node.method import DecomposeSettings, as_classifier, check_data, chosen_classes
from .node.method import decompose as decompose_nodes
from .recipes import chosen, merging_overrides, node_settings, slim_settings
from .runtime import Passes
from .slim.config import SlimSettings
from .slim.make import slim_modules
from .slim.merged import MergedSlim, as_made, merge_slim
from .slim.module import SlimModule

GRANULARITIES = ("node", "channel")
CALIBRATION_SAMPLES = 100  # held-out training inputs per class that fit each module's score calibration


def decompose(model: nn.Module, data, variant: str | None = None, *, granularity: str = "node",
              classes: list[int] | None = None, recipe: str | DecomposeSettings | SlimSettings | None = None,
              passes: Passes | None = None, **given) -> list[BinaryModule]:
    """One module per class of ``model`` (or per class in ``classes``), observed on ``data``, its training split
    (an :class:`~cnnmod.data.dataset.ImageSet` or a torch Dataset of (image, label) pairs).

    ``granularity``: ``node`` (the paper's masks over the model) or ``channel`` (slim modules, physically
    smaller; ``size`` a fraction of the model's parameters, or ``max_loss`` in pp). ``recipe``: best (the
    default), paper, cheap or small (:mod:`cnnmod.recipes`), or the settings themselves (a
    :class:`~cnnmod.node.DecomposeSettings` or :class:`~cnnmod.slim.SlimSettings`); fields of the recipe given
    as keywords override it (``step=0.3``). ``calibration_samples`` (default 100) held-out inputs
    per class fit each module's score calibration (0: none)."""
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; use node or channel")
    if variant is not None:
        given["variant"] = variant
    settings = recipe if isinstance(recipe, (DecomposeSettings, SlimSettings)) else None
    recipe = None if settings is not None else recipe
    if granularity == "node":
        s = replace(settings, **given) if settings is not None else node_settings(recipe, **given)
        return decompose_nodes(model, data, settings=s, classes=classes, passes=passes)
    given.pop("variant", None)
    samples = given.pop("calibration_samples", CALIBRATION_SAMPLES)
    data = as_image_set(data)
    clf = as_classifier(model, data)
    check_data(clf, data)
    passes = passes or Passes()
    if passes.device is not None:
        clf = clf.to(passes.device)
    chosen = chosen_classes(clf, classes)
    if settings is not None:
        s = replace(settings, **given)
    else:
        s = slim_settings(recipe, every_class=len(chosen) == clf.num_classes, **given)
    modules = slim_modules(clf, data, chosen, s, passes.batch_size)
    if samples > 0:
        calibrate_decomposition(modules, data, samples, s.seed, passes.batch_size)
    for m in modules:  # what a merged composition of them starts from (not part of the module's state)
        object.__setattr__(m, "_made_from", (clf, data))
    return modules


def compose(modules: Sequence[BinaryModule], mode: str | None = None, calibration: str | None = None, *,
            model: Classifier | None = None, data: ImageSet | None = None,
            **pruning) -> Composition | MergedSlim:
    """A classifier over ``modules``' classes: uint8 images (B, C, H, W) -> scores p_c (B, K).

    ``mode`` and ``calibration`` default as the command line's (:func:`cnnmod.recipes.chosen`: one model's
    modules run merged, in one pass; modules of several models vote, their scores calibrated). Slim modules
    merge when their model is at hand (given, or they were made in this session by :func:`decompose`); else
    they vote.
    Slim modules merge into one network fitted on their source ``model``'s training split ``data`` (default: the
    ones they were made from, or the model's own data set by name); ``size`` or ``max_loss`` prune that network
    further for its classes."""
    modules = list(modules)
    if not modules:
        raise UserError("nothing to compose: give at least one module")
    at_hand = model is not None or getattr(modules[0], "_made_from", None) is not None
    if mode is None and not at_hand and any(isinstance(m, SlimModule) for m in modules):
        mode = "vote"  # merging slim modules needs their model: without it they vote
    mode, calibration, _ = chosen(modules, mode, calibration)
    if mode == "merged" and all(isinstance(m, SlimModule) for m in modules):
        if calibration != "none":
            raise UserError("a merged slim composition fits its heads together: compose it with «calibration» none")
        return merge(modules, model, data, **pruning)
    if pruning:
        raise UserError(f"«{next(iter(pruning))}» prunes a merged slim composition: compose slim modules of one "
                        "model with «mode» merged")
    return compose_modules(modules, calibration=calibration, mode=mode)


def merge(modules: list[SlimModule], model: Classifier | None, data: ImageSet | None, **pruning) -> MergedSlim:
    """Slim modules of one model merged into one network (:func:`cnnmod.slim.merged.merge_slim`)."""
    made = getattr(modules[0], "_made_from", None)
    source = model or (made[0] if made else None)
    if source is None:
        raise UserError("merging slim modules needs the model they were cut from: cnnmod.compose(modules, "
                        "mode='merged', model=model)")
    if data is None:
        data = made[1] if made and made[0] is source else split_for(source, None, None, "train")
    return merge_slim(modules, source, as_image_set(data), as_made(modules, **merging_overrides(**pruning)))


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
