"""Slim modules in the table of kinds (:mod:`cnnmod.modules.kinds`): their settings and recipes, how they are
made (one pruning run per class, so torchrun spreads classes over its processes), the merged network of one
model's slim modules and the fused networks of several models', and their folders (:mod:`.artifact`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..composition.base import ComposerKind, register_composer_kind
from ..composition.fitting import calibrate_decomposition
from ..errors import UserError
from ..modules.kinds import Composing, ModuleKind, register_module_kind
from ..progress import progress_bar, say
from .artifact import load_fused_slim, load_merged, load_slim, save_fused_slim, save_merged, write_slim
from .config import MODULE_SIZE, RECIPES, SlimSettings, merged_settings, slim_settings
from .make import check_joint, slim_modules
from .merged import FusedSlim, MergedSlim, merge_slim

CALIBRATION_SAMPLES = 100  # held-out training inputs per class that fit each module's score calibration


def check_run(s: SlimSettings, classes: Sequence[int], num_classes: int, processes: int) -> None:
    """What the settings cannot do in this run, refused before any work: under torchrun (``processes`` > 1) a
    total budget or joint heads (both need every module in one process); joint heads without a module of every
    class."""
    if processes > 1 and s.budget == "total":
        raise UserError("«budget» total prunes all modules together in one process: run it without torchrun, "
                        "or use «budget» module")
    if processes > 1 and s.joint_heads > 0:
        raise UserError("«joint_heads» refits every module's head together in one process: run it without "
                        "torchrun, or leave «joint_heads» at 0")
    check_joint(s, list(classes), num_classes)


def make(model, data, settings: SlimSettings, classes: list[int], passes, clock,
         calibration_samples: int | None = None) -> list:
    """The kind's ``decompose``: the slim modules of ``classes`` (:func:`cnnmod.slim.make.slim_modules`), then
    their score calibrations."""
    s = settings.resolved(MODULE_SIZE)
    s.check()
    show = passes.progress and passes.dd.is_main
    with clock("decomposition"), progress_bar("slimming", len(classes), show) as step:
        modules = slim_modules(model, data, classes, s, passes.batch_size,
                               done=lambda m: step(params=f"{m.metrics['params_fraction']:.2f}"), keep=passes.keep)
    held = [m.metrics["params_fraction"] for m in modules]
    if s.default_size and held and sum(held) / len(held) > s.size + 0.005 and passes.dd.is_main:
        say(f"the default size {s.size:g} is out of reach for {model.arch}: every channel group is down to one "
            f"channel at {sum(held) / len(held):.2f} of its parameters on average, so the modules hold that"
            + (f" ({len(whole)} layer{'s' * (len(whole) > 1)} kept whole: the modules' cards say which)"
               if (whole := modules[0].metrics.get("whole")) else ""))
    samples = CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples
    if samples > 0 and modules:
        with clock("calibration"):
            calibrate_decomposition(modules, data, samples, s.seed, passes.batch_size, show)
    return modules


def describe(model, settings: SlimSettings, data, processes: int) -> str:
    s = settings.resolved(MODULE_SIZE)
    return (f"slimming {model.arch} ({model.num_classes} classes) to {s.size:g} of its parameters"
            + (f" within {s.max_loss:g} pp" if s.max_loss is not None else "") + f", {s.rule} importance"
            + (f", then their heads refitted together (weight {s.joint_heads:g})" if s.joint_heads else "")
            + (f", classes spread over {processes} processes" if processes > 1 else ""))


def merged_network(modules, sources, calibration: str = "none", **pruning) -> MergedSlim:
    """Slim modules of one model as one network, the union of their kept channels, fitted to the composition's
    classes on the model's training split and pruned further as ``pruning`` asks (:func:`merged_settings`)."""
    if calibration != "none":
        raise UserError("a merged slim composition fits its heads together: compose it with «calibration» none")
    if len({m.source_sha for m in modules}) > 1:
        raise UserError("«mode» merged needs slim modules of one model; these come from several: use «mode» fused "
                        "(one merged network per model, their scores side by side)")
    source = sources.model_for(modules[0], "merging slim modules")
    return merge_slim(list(modules), source, sources.training_split(source),
                      merged_settings(modules[0].settings, **pruning), batch_size=sources.batch_size)


def fused_networks(modules, sources, calibration: str = "none") -> FusedSlim:
    """Slim modules of several models: each model's merged into one network (observed as its modules were) whose
    head rows are also fitted on the other models' classes (their training images, as inputs of none of its
    classes), run side by side; grouped by model in the order their modules come."""
    if calibration != "none":
        raise UserError("a fused slim composition fits its heads together: compose it with «calibration» none")
    by_model: dict[str | None, list] = {}
    for m in modules:
        by_model.setdefault(m.source_sha, []).append(m)
    groups = [(ms, sources.model_for(ms[0], "fusing slim modules")) for ms in by_model.values()]
    parts = []
    with progress_bar("fusing", len(groups)) as step:
        for ms, source in groups:
            others = [m for m in modules if m.source_sha != ms[0].source_sha]
            parts.append(merge_slim(ms, source, sources.training_split(source), merged_settings(ms[0].settings),
                                    foreign=list(sources.class_sets(others).values()),
                                    batch_size=sources.batch_size))
            step()
    return FusedSlim(parts)


def merged_summary(merged: MergedSlim, sources) -> dict:
    return {"granularity": "channel", "params_fraction": merged.metrics["params_fraction"],
            **{k: merged.metrics[k] for k in ("held_out_model_top1", "held_out_top1") if k in merged.metrics}}


def fused_summary(fused: FusedSlim, sources) -> dict:
    total = sum(source.params() for source in sources)
    return {"granularity": "channel", "parts": len(sources), "params_fraction": round(fused.params() / total, 4)}


KIND = register_module_kind(ModuleKind(
    "channel", "slim modules", SlimSettings, slim_settings, ("best", *RECIPES), make, describe, write_slim, load_slim,
    check=lambda s, classes, n, processes: check_run(s.resolved(MODULE_SIZE), classes, n, processes),
    spreads=True, compositions=(Composing("merged-network", "merged", merged_network, network=True, prunes=True),
                                Composing("fused-networks", "fused", fused_networks, network=True))))
register_composer_kind(ComposerKind("merged-network", "channel", "merged", save_merged, load_merged, merged_summary))
register_composer_kind(ComposerKind("fused-networks", "channel", "fused", save_fused_slim, load_fused_slim,
                                    fused_summary))
