"""The settings a user gets: the named recipes of both module kinds, and the default, which is the best each kind
has measured (docs/commands.md, "Defaults", gives the figure behind every choice).

    best    (the default) node-level: the paper's method switching nodes off only where a ReLU follows
            (``exact_only``); slim: ``cheap`` at half the parameters or more, ``small`` below half
    paper   the paper's own settings (node-level; ``cnnmod reproduce`` uses them)
    cheap   slim modules at half the parameters in about 1 % of the model's training
    small   slim modules at a quarter of the parameters in about a fifth of the model's training

A recipe is a :class:`~cnnmod.node.DecomposeSettings` or :class:`~cnnmod.slim.SlimSettings`; any of their fields
given beside it overrides it (``recipe="small", step=0.3``; on the command line ``--set step=0.3``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields, replace

from .errors import UserError
from .modules.kinds import kind_of
from .node.method import DecomposeSettings
from .slim.config import MODULE_SIZE, RECIPES, SlimSettings

NODE_RECIPES = {
    "best": DecomposeSettings(exact_only=True),
    "paper": DecomposeSettings(),
}
RECIPE_NAMES = ("best", "paper", *RECIPES)
SMALL_BELOW = 0.5  # the best slim recipe is ``small`` for sizes under this, ``cheap`` from it up

# fields kept for the method's ablations (benchmarks/decomposition.py), not offered as settings
RESEARCH_FIELDS = {"condition", "tau", "correct_only", "relative_delta"}
# fields that are not settings of a recipe (the seed and the recipe's own name come from elsewhere)
NOT_SETTINGS = {"seed", "recipe"}


def settable(cls: type) -> list[str]:
    """The fields of ``cls`` that a user may set (``--set KEY=VALUE``)."""
    return [f.name for f in fields(cls) if f.name not in RESEARCH_FIELDS | NOT_SETTINGS]


def node_settings(recipe: str | None = None, **given) -> DecomposeSettings:
    """Node-level settings: the named recipe (None: ``best``), ``given`` fields overriding it."""
    name = recipe or "best"
    if name in RECIPES:
        raise UserError(f"«recipe» {name} makes slim modules: add «granularity» channel, or use «recipe» best or "
                        "paper")
    if name not in NODE_RECIPES:
        raise UserError(f"unknown recipe {name!r}; use {', '.join(RECIPE_NAMES)}")
    _check_names(DecomposeSettings, given, "node-level modules")
    return replace(NODE_RECIPES[name], **given)


def slim_settings(recipe: str | None = None, *, every_class: bool = True, one_process: bool = True,
                  **given) -> SlimSettings:
    """Slim settings: the named recipe, ``given`` fields overriding it. With none named (``best``): ``cheap``
    at ``size`` 0.5 or more (the default size is 0.5), ``small`` below; by ``max_loss``, ``cheap`` with each
    module's own budget. ``best`` fits itself to the run: without ``every_class`` the heads are not refitted
    together (that needs a module of every class), and under torchrun (not ``one_process``) each module is
    pruned alone. A recipe named explicitly is taken as it is (and refused where it cannot run)."""
    name = recipe or "best"
    if name == "paper":
        raise UserError("the paper makes no slim modules: use «recipe» best, cheap or small, or «granularity» node")
    if name not in RECIPE_NAMES:
        raise UserError(f"unknown recipe {name!r}; use {', '.join(RECIPE_NAMES)}")
    _check_names(SlimSettings, given, "slim modules")
    if name != "best":
        return replace(RECIPES[name], **given)
    size, max_loss = given.get("size"), given.get("max_loss")
    chosen = "small" if size is not None and size < SMALL_BELOW else "cheap"
    fitted: dict = {}
    if max_loss is not None:
        fitted.update(budget="module", size=None)  # as far as the loss allows (``size`` given: a floor)
    if not every_class:
        fitted["joint_heads"] = 0.0
    if not one_process:
        fitted.update(budget="module", joint_heads=0.0)
    s = replace(RECIPES[chosen], **{**fitted, **given})
    return s if s.size is not None or s.max_loss is not None else replace(s, size=MODULE_SIZE)


# the fields of a merged slim composition's own pruning, as :func:`merging_settings` gives them
PRUNING = ("size", "max_loss", "rule", "reconstruct", "scale_epochs", "scale_bn", "cost", "multiple")


def merging_overrides(size: float | None = None, max_loss: float | None = None, **given) -> dict:
    """The :class:`SlimSettings` fields a merged slim composition is pruned with (:func:`merging_settings`), to
    give :func:`cnnmod.slim.merged.as_made`; none when neither ``size`` nor ``max_loss`` asks for pruning (and
    then no other field may be given)."""
    if size is None and max_loss is None:
        if given:
            raise UserError(f"«{next(iter(given))}» shapes how «size» prunes a merged slim composition: give «size» "
                            "too, or drop it")
        return {}
    s = merging_settings(size=size, max_loss=max_loss, **given)
    return {k: getattr(s, k) for k in PRUNING}


def merging_settings(**given) -> SlimSettings:
    """How a merged slim composition is pruned further when asked to (``size`` or ``max_loss``): Fisher
    importance, least-squares reconstruction, then channel scales and BatchNorm's affine learned for the
    composition's classes (the recipe measured on the seven pairs of BENCHMARKS.md)."""
    _check_names(SlimSettings, given, "merged slim compositions")
    best = {"rule": "fisher", "reconstruct": True, "scale_epochs": 3, "scale_bn": True, "recipe": "merging"}
    return SlimSettings(**{**best, **given})


def _check_names(cls: type, given: dict, what: str) -> None:
    allowed = settable(cls) + ["seed"]
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a setting of {what}; the settings are: {', '.join(settable(cls))}")


def parse_setting(cls: type, key: str, text: str):
    """``text`` as the value of ``cls``'s field ``key`` (bool, int, float, str, or None where the field may be
    None)."""
    hints = typing.get_type_hints(cls)
    if key not in hints or key in RESEARCH_FIELDS | NOT_SETTINGS:
        raise UserError(f"{key!r} is not a setting here; the settings are: {', '.join(settable(cls))}")
    hint = hints[key]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if type(None) in kinds and text.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        if kind is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
        elif kind in (int, float, str):
            try:
                return kind(text)
            except ValueError:
                continue
    words = {bool: "true or false", int: "whole number", float: "number", str: "text"}
    wanted = " or ".join(words.get(k, k.__name__) for k in kinds if k is not type(None))
    raise UserError(f"the setting {key}={text!r} is not a {wanted}" + (" (or none)" if type(None) in kinds else ""))


def composition_defaults(modules) -> tuple[str, str, str]:
    """How a composition of ``modules`` runs and compares their scores when the user does not say: (mode,
    calibration, why). One model's modules run merged, one pass (slim ones as one network; node-level ones on
    the union of their nodes); their scores come from one model and are compared as they are. Modules of several
    models vote, each score Platt-calibrated; of several data sets, Platt times each module's in-distribution
    test (``platt-ood``). Where the modules lack what a calibration needs, the next best that they have."""
    sources = {m.source_key if m.source_model is not None else m.source_sha for m in modules}
    datasets = {m.ref.dataset for m in modules}
    if len(sources) == 1:
        merges = all(m.union_pass or "merged" in kind_of(m).networks for m in modules)
        kinds = {kind_of(m).name for m in modules}
        if merges and len(kinds) == 1:
            return "merged", "none", "the modules of one model run as one network, in one pass"
        return "vote", "none", "the modules of one model compared as they are"
    if len(datasets) > 1 and all(m.calibration and m.typical is not None for m in modules):
        return "vote", "platt-ood", "modules of several data sets: Platt, times each in-distribution test"
    if all(m.calibration for m in modules):
        return "vote", "platt", "modules of several models: Platt-calibrated scores"
    return "vote", "none", "modules of several models, some without calibration: scores compared as they are"


def chosen(modules, mode: str | None, calibration: str | None, refitted: bool = False) -> tuple[str, str, str]:
    """The mode and calibration a composition of ``modules`` runs with: as given, the rest chosen to fit
    (:func:`composition_defaults`). Platt times the in-distribution test needs voting (each module's own
    activations), so a calibration of platt-ood given alone votes, and a mode given alone drops it to platt;
    modules refitted on the composition's classes (continuous learning, refitted heads) vote, Platt-calibrated
    where they can be. The third value says why, in words."""
    default_mode, default_calibration, why = composition_defaults(modules)
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
            networks = all(mode in kind_of(m).networks for m in modules)
            calibration = "none" if networks else ("platt" if calibration == "platt-ood" else calibration)
    if mode != default_mode:
        why = f"mode {mode} as asked"
    return mode, calibration, why
