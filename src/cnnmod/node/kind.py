"""The paper's kind in the table of kinds (:mod:`cnnmod.modules.kinds`): its settings and recipes, how it
decomposes and relearns, the merged composition it runs (one pass through the union of its modules' nodes), and
its folders (:mod:`.artifact`)."""

from __future__ import annotations

from dataclasses import replace

from ..composition.voting import Composition
from ..core.graph import ModelGraph
from ..errors import UserError
from ..modules.kinds import Composing, ModuleKind, register_module_kind
from .artifact import load_node, write_node
from .method import DecomposeSettings, decompose, relearn

RECIPES = {
    "best": DecomposeSettings(exact_only=True),  # switch nodes off only where a ReLU follows (docs/commands.md)
    "paper": DecomposeSettings(),
}


def node_settings(recipe: str | None = None, *, every_class: bool = True, one_process: bool = True,
                  **given) -> DecomposeSettings:
    """Node-level settings: the named recipe (None: ``best``), ``given`` fields overriding it. The run
    (``every_class``, ``one_process``) changes nothing: the recipes suit every run."""
    name = recipe or "best"
    if name not in RECIPES:
        raise UserError(f"«recipe» {name} does not make node-level modules; use {' or '.join(RECIPES)}")
    return replace(RECIPES[name], **given)


def make(model, data, settings: DecomposeSettings, classes: list[int], passes, clock,
         calibration_samples: int | None = None) -> list:
    """The kind's ``decompose``: :func:`cnnmod.node.method.decompose`."""
    if calibration_samples is not None:
        settings = replace(settings, calibration_samples=calibration_samples)
    return decompose(model, data, settings=settings, classes=classes, passes=passes, clock=clock)


def follows_node_rule(model) -> UserError | None:
    """None where the model's hidden activations are of the ReLU family the paper's node rule needs, else why
    not."""
    try:
        ModelGraph(model.net, model.spec.shape).require_relu()
    except UserError as e:
        return e
    return None


def describe(model, settings: DecomposeSettings, data, processes: int) -> str:
    return (f"decomposing {model.arch} ({model.num_classes} classes) with {settings.variant}: up to "
            f"{settings.ci_samples} inputs per class of {data.name}")


def union_pass(modules, sources, calibration: str = "none") -> Composition:
    """One model's node-level modules as one pass through the union of their kept nodes, their heads on it."""
    return Composition(modules, calibration=calibration, mode="merged")


def union_passes(modules, sources, calibration: str = "none") -> Composition:
    """Node-level modules of several models: one union pass per model, their scores side by side."""
    return Composition(modules, calibration=calibration, mode="fused")


KIND = register_module_kind(ModuleKind(
    "node", "node-level modules", DecomposeSettings, node_settings, tuple(RECIPES), make, describe, write_node,
    load_node, fits=follows_node_rule, compositions=(Composing("union-pass", "merged", union_pass),
                                             Composing("union-passes", "fused", union_passes)), relearn=relearn,
    refits=True))
