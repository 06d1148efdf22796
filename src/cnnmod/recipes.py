"""The settings a user gets: each kind's named recipes, and the default, which is the best each kind has measured
(docs/commands.md, "Defaults", gives the figure behind every choice); and ``--set KEY=VALUE`` texts read as the
fields they set.

    best    (the default) node-level: the paper's method switching nodes off only where a ReLU follows
            (``exact_only``); slim: ``cheap`` at half the parameters or more, ``small`` below half
    paper   the paper's own settings (node-level; ``cnnmod reproduce`` uses them)
    cheap   slim modules at half the parameters in about 1 % of the model's training
    small   slim modules at a quarter of the parameters in about a fifth of the model's training

A recipe is an instance of its kind's settings type (:class:`~cnnmod.node.DecomposeSettings`,
:class:`~cnnmod.slim.SlimSettings`); any of their fields given beside it overrides it (``recipe="small", step=0.3``;
on the command line ``--set step=0.3``). Each kind resolves its own (:class:`~cnnmod.modules.kinds.ModuleKind`
``recipe``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from .errors import UserError
from .modules.kinds import ModuleKind, kinds

# fields that are not settings of a recipe (the seed and the recipe's own name come from elsewhere; the node
# kind's ablation is the benchmarks')
NOT_SETTINGS = {"seed", "recipe", "ablation"}


def settable(cls: type) -> list[str]:
    """The fields of ``cls`` that a user may set (``--set KEY=VALUE``)."""
    return [f.name for f in fields(cls) if f.name not in NOT_SETTINGS]


def recipe_names() -> tuple[str, ...]:
    """Every recipe name of every kind."""
    return tuple(dict.fromkeys(n for k in kinds().values() for n in k.names))


def settings_for(kind: ModuleKind, recipe: str | None = None, *, every_class: bool = True, one_process: bool = True,
                 **given):
    """``kind``'s settings: its named recipe (None: its best, fitted to the run), ``given`` fields overriding it;
    a name or field of another kind is refused naming that kind."""
    if recipe is not None and recipe not in kind.names:
        owner = next((k for k in kinds().values() if recipe in k.names), None)
        if owner is None:
            raise UserError(f"unknown recipe {recipe!r}; use {', '.join(recipe_names())}")
        raise UserError(f"«recipe» {recipe} makes {owner.what}: add «granularity» {owner.name}, or use «recipe» "
                        f"{' or '.join(kind.names)}")
    allowed = settable(kind.settings) + ["seed"]
    for key in given:
        if key not in allowed:
            owner = next((k for k in kinds().values() if key in settable(k.settings)), None)
            if owner is not None and owner is not kind:
                raise UserError(f"«{key}» applies to {owner.what}: add «granularity» {owner.name}")
            raise UserError(f"{key!r} is not a setting of {kind.what}; the settings are: "
                            f"{', '.join(settable(kind.settings))}")
    return kind.recipe(recipe, every_class=every_class, one_process=one_process, **given)


def parse_setting(cls: type, key: str, text: str):
    """``text`` as the value of ``cls``'s field ``key`` (bool, int, float, str, or None where the field may be
    None)."""
    hints = typing.get_type_hints(cls)
    if key not in hints or key in NOT_SETTINGS:
        raise UserError(f"{key!r} is not a setting here; the settings are: {', '.join(settable(cls))}")
    hint = hints[key]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
        elif option in (int, float, str):
            try:
                return option(text)
            except ValueError:
                continue
    words = {bool: "true or false", int: "whole number", float: "number", str: "text"}
    wanted = " or ".join(words.get(k, k.__name__) for k in options if k is not type(None))
    raise UserError(f"the setting {key}={text!r} is not a {wanted}" + (" (or none)" if type(None) in options else ""))


