"""``cnnmod decompose``, ``evaluate``, ``compose``, ``replace``, ``remove``, ``reproduce``, ``export`` and
``version``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from .. import __version__
from ..errors import UserError
from .app import COUNTRY, DATA_ROOT, DEVICE, JSON, OVERWRITE, SEED, app, emit


@app.command("decompose")
def decompose_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A model folder (cnnmod train or cnnmod import made it)."),
    out: Path = typer.Option(..., "--out", help="Output decomposition folder: the model once, one folder per module."),
    data: str = typer.Option(None, "--data", help="Data set to observe (default: the one the model was trained on)."),
    variant: str = typer.Option("mc-bln", "--variant", help="mc, mc-bln (the paper's choice) or mc-bi."),
    classes: str = typer.Option(None, "--classes", help="Decompose only these classes, e.g. 0,3,7."),
    ci_samples: int = typer.Option(1000, "--ci-samples", help="Training inputs observed per class."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Switch nodes off only where a ReLU follows "
                                    "(pre-activation networks: a 0 before an addition or BatchNorm is not "
                                    "inactive)."),
    delta: float = typer.Option(0.5, "--delta", help="MC-BLN's weight threshold."),
    granularity: str = typer.Option("node", "--granularity",
                                    help="node (the paper's masks) or channel (slim modules, physically smaller)."),
    size: float = typer.Option(None, "--size", help="Slim modules: target fraction of the model's parameters "
                               "(default 0.5; with --max-loss, a floor)."),
    max_loss: float = typer.Option(None, "--max-loss", help="Slim modules: the smallest module losing at most this "
                                   "many pp of binary accuracy on the model's validation images."),
    rule: str = typer.Option("taylor", "--rule", help="Slim modules: channel importance, taylor or fisher (each "
                             "input's gradient, squared)."),
    scale_epochs: int = typer.Option(0, "--scale-epochs", help="Slim modules: after the last pruning step, learn a "
                                     "scale per kept channel (backbone frozen, folded into the weights) for this "
                                     "many epochs over the observed inputs (0: none)."),
    scale_bn: bool = typer.Option(False, "--scale-bn", help="Slim modules, with --scale-epochs: learn every "
                                  "BatchNorm layer's scale and shift with the channel scales (convolutions stay "
                                  "frozen)."),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="Slim modules: after the last pruning step, refit "
                                     "the kept weights of every convolution by least squares so that each layer's "
                                     "outputs match the model's own (no loss, no labels)."),
    joint_heads: float = typer.Option(0.0, "--joint-heads", help="Slim modules of every class: refit their heads "
                                      "together, each module's binary loss plus this weight times their "
                                      "composition's cross-entropy (0: each head alone)."),
    slim_samples: int = typer.Option(2048, "--slim-samples", help="Slim modules: concerned inputs observed."),
    slim_cost: str = typer.Option("params", "--slim-cost", help="Slim modules: rank channels by importance per "
                                  "parameter (params) or per FLOP (flops)."),
    slim_multiple: int = typer.Option(1, "--slim-multiple", help="Slim modules: keep every layer's channel count a "
                                      "multiple of this when above it (8 suits CPU convolutions)."),
    slim_budget: str = typer.Option("module", "--slim-budget", help="Slim modules: module (each holds at most "
                                    "--size) or total (the modules hold --size on average: pruned together, "
                                    "channels ranked across them)."),
    slim_step: float = typer.Option(0.2, "--slim-step", help="Slim modules: share of the kept parameters each "
                                    "pruning step cuts, in (0, 1)."),
    slim_step_samples: int = typer.Option(1024, "--slim-step-samples", help="Slim modules: observed inputs each "
                                          "pruning step ranks and refits on (0: all; the last refit uses all)."),
    slim_recipe: str = typer.Option(None, "--slim-recipe", help="Slim modules: a measured recipe, cheap (half the "
                                    "parameters in about 1 % of the model's training) or small (a quarter, "
                                    "about a fifth of its training); the slim flags given beside it override it."),
    calibration_samples: int = typer.Option(100, "--calibration-samples",
                                            help="Held-out training inputs per class to fit score calibration."),
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Record each module's binary accuracy on the test split."),
    batch_size: int = typer.Option(256, "--batch-size"),
    seed: int = SEED, device: str = DEVICE, data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE,
    country: str = COUNTRY, as_json: bool = JSON,
) -> None:
    """Decompose a model into one binary module per class (Pan & Rajan's CI + TI + MC)."""
    from ..data import parse_class_list
    from ..jobs.common import Run
    from ..jobs.decompose import decompose_dir
    from ..node.method import DecomposeSettings
    from ..slim.config import SlimSettings

    settings = DecomposeSettings(variant=variant, delta=delta, ci_samples=ci_samples, seed=seed,
                                 exact_only=exact_only, calibration_samples=calibration_samples)
    if granularity not in ("node", "channel"):
        raise UserError(f"unknown granularity {granularity!r}; use node or channel")
    slim = None
    if granularity == "channel":
        fields = {"size": size, "max_loss": max_loss, "rule": rule, "samples": slim_samples, "cost": slim_cost,
                  "multiple": slim_multiple, "step_samples": slim_step_samples or None, "budget": slim_budget,
                  "step": slim_step, "scale_epochs": scale_epochs, "scale_bn": scale_bn,
                  "joint_heads": joint_heads, "reconstruct": reconstruct}
        options = {"samples": "slim_samples", "cost": "slim_cost", "multiple": "slim_multiple",
                   "step_samples": "slim_step_samples", "budget": "slim_budget", "step": "slim_step"}
        given = {k: v for k, v in fields.items() if slim_recipe is None or
                 ctx.get_parameter_source(options.get(k, k)).name != "DEFAULT"}
        slim = SlimSettings.from_recipe(slim_recipe, **given, seed=seed)
    elif size is not None or max_loss is not None or slim_recipe is not None:
        raise UserError("--size, --max-loss and --slim-recipe apply to slim modules: add --granularity channel")
    result = decompose_dir(model_dir, out, settings, Run(device, data_root, batch_size, overwrite, country),
                           slim=slim, data=data, classes=parse_class_list(classes), measure=measure)
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result, as_json, f"decomposed {model_dir} into {out}")


@app.command("evaluate")
def evaluate_cmd(
    paths: list[Path] = typer.Argument(..., help="A decomposition or composition folder, or module folders."),
    data: str = typer.Option(None, "--data", help="Test data for one model's modules (default: its data set)."),
    calibration: str = typer.Option(None, "--calibration",
                                    help="none, temperature, platt or platt-ood (default: the "
                                    "composition's own)."),
    mode: str = typer.Option(None, "--mode", help="vote, merged or fused (default: the composition's own)."),
    cost: bool = typer.Option(True, "--cost/--no-cost", help="Measure parameters, FLOPs and latency too."),
    latency_batch: int = typer.Option(256, "--latency-batch", help="Batch size of the latency measurement."),
    batch_size: int = typer.Option(512, "--batch-size"),
    device: str = DEVICE, data_root: str = DATA_ROOT, country: str = COUNTRY, as_json: bool = JSON,
) -> None:
    """Composed modules on their classes' test images: top-1/top-5 and per-class accuracy; for one model's
    modules also the model on the same images, the decomposition cost and Jaccard indices."""
    from ..jobs.common import Run
    from ..jobs.evaluate import EvaluateSettings, evaluate_dir

    result = evaluate_dir(paths, EvaluateSettings(data, calibration, mode, cost, latency_batch),
                          Run(device, data_root, batch_size, country=country))
    emit(result, as_json, "model vs composed modules")


@app.command("compose")
def compose_cmd(
    paths: list[Path] = typer.Argument(..., help="Module folders; a decomposition or composition folder stands for "
                                       "all its modules. Modules may come from several models and data sets."),
    out: Path = typer.Option(..., "--out", help="Output composition folder."),
    continuous_learning: bool = typer.Option(False, "--continuous-learning",
                                             help="Modules relearn the other data sets' classes (no training)."),
    refit_heads: bool = typer.Option(False, "--refit-heads",
                                     help="Beyond the paper: refit each module's two-way head on the composition's "
                                     "classes (a linear fit on the features it already computes; no network "
                                     "weight changes), then its calibration."),
    calibration: str = typer.Option("none", "--calibration",
                                    help="Compare scores as they are (none, the paper) or calibrated: temperature, "
                                    "platt, or platt-ood (Platt times each module's in-distribution test; for "
                                    "modules of several data sets)."),
    mode: str = typer.Option("vote", "--mode", help="vote (the paper: a pass per module), merged (one model's "
                             "modules as one network, one pass) or fused (one merged pass per source model)."),
    size: float = typer.Option(None, "--size", help="Merged slim compositions: prune the merged network further, "
                               "for the composition's own classes, to this fraction of the model's parameters."),
    slim_cost: str = typer.Option(None, "--slim-cost", help="With --size: rank channels per parameter or per FLOP, "
                                  "params or flops (as for decompose; default params)."),
    slim_multiple: int = typer.Option(1, "--slim-multiple", help="With --size: keep channel counts a multiple of "
                                      "this (as for decompose)."),
    max_loss: float = typer.Option(None, "--max-loss", help="Merged slim compositions: prune the merged network "
                                   "as far as its top-1 among its classes stays within this many points of the "
                                   "model's, on its validation images (--size is then a floor)."),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="With --size or --max-loss: once pruned, refit "
                                     "the merged network's kept weights by least squares so that each layer's "
                                     "outputs match the model's own (no loss, no labels)."),
    rule: str = typer.Option("taylor", "--rule", help="With --size or --max-loss: channel importance for the "
                             "merged network's pruning, taylor or fisher."),
    scale_epochs: int = typer.Option(0, "--scale-epochs", help="With --size or --max-loss: once pruned, learn a "
                                     "scale per kept channel for the composition's own classes for this many "
                                     "epochs (folded into the weights; convolutions frozen)."),
    scale_bn: bool = typer.Option(False, "--scale-bn", help="With --scale-epochs: learn every BatchNorm layer's "
                                  "scale and shift with the channel scales."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = DEVICE, data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE, country: str = COUNTRY,
    as_json: bool = JSON,
) -> None:
    """Reuse: compose modules into a new classifier over their classes."""
    from ..jobs.common import Run
    from ..jobs.compose import ComposeSettings, compose_dirs

    settings = ComposeSettings(continuous_learning, refit_heads, calibration, mode, size, slim_cost, slim_multiple,
                               max_loss, reconstruct, rule, scale_epochs, scale_bn)
    result = compose_dirs(paths, out, settings, Run(device, data_root, batch_size, overwrite, country))
    emit(result, as_json, f"composed {len(result['classes'])} modules into {out}")


@app.command("replace")
def replace_cmd(
    target: Path = typer.Argument(..., help="A composition or decomposition folder."),
    cls: str = typer.Option(..., "--class", help="The class to replace: dataset:name, dataset:index, a name or index."),
    replacement: Path = typer.Option(..., "--with", help="The module folder that takes its place."),
    out: Path = typer.Option(..., "--out", help="Output composition folder."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, as_json: bool = JSON,
) -> None:
    """Replace: swap one class's module for another module (another model's, or another class's)."""
    from ..jobs.common import Run
    from ..jobs.compose import replace_dir

    result = replace_dir(target, cls, replacement, out, Run(device, overwrite=overwrite))
    emit(result, as_json, f"replaced {result['replaced']} by {result['with']}")


@app.command("remove")
def remove_cmd(
    target: Path = typer.Argument(..., help="A composition or decomposition folder."),
    cls: str = typer.Option(..., "--class", help="The class to remove: dataset:name, dataset:index, a name or index."),
    out: Path = typer.Option(..., "--out", help="Output composition folder."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, as_json: bool = JSON,
) -> None:
    """Remove: the composition without one class's module."""
    from ..jobs.common import Run
    from ..jobs.compose import remove_dir

    result = remove_dir(target, cls, out, Run(device, overwrite=overwrite))
    emit(result, as_json, f"removed {result['removed']}")


@app.command("reproduce")
def reproduce_cmd(
    preset: str = typer.Option("quick", "--preset", help="quick (minutes on 2 CPU cores, small models) or full."),
    out: Path = typer.Option(..., "--out", help="Study folder: caches, results.json, report.md, report.html."),
    data: str = typer.Option("fashion-mnist", "--data", help="The main data set."),
    second_data: str = typer.Option("digits", "--second-data", help="The second data set (inter-data-set scenarios)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Go on with a study already in --out."),
    seed: int = SEED, device: str = DEVICE, data_root: str = DATA_ROOT, country: str = COUNTRY,
    as_json: bool = JSON,
) -> None:
    """The paper's whole study: decomposition cost, reuse, replacement, energy, the dense table; with a report."""
    from ..artifacts import write_json
    from ..experiments.presets import preset as get_preset
    from ..experiments.report import write_report
    from ..experiments.study import Study

    study = Study(out, get_preset(preset), (data, second_data), country, seed, device, data_root, resume)
    command = " ".join(["cnnmod", "reproduce", "--preset", preset, "--data", data, "--second-data", second_data,
                        "--seed", str(seed), "--country", study.meter.country])
    written: list[Path] = []

    def report(results: dict) -> None:  # after every part: results.json and the report so far
        results["command"] = command
        write_json(Path(out) / "results.json", results)
        written[:] = write_report(results, Path(out))

    results = study.run(on_part=report)
    md, page = written
    summary = {"out": str(out), "preset": preset, "report": str(page), "markdown": str(md),
               "seconds_this_run": results["seconds_this_run"], **results["summary"]}
    emit(summary, as_json, f"study ({preset}) in {out}")


@app.command("export")
def export_cmd(
    paths: list[Path] = typer.Argument(..., help="A module, decomposition or composition folder (or several)."),
    onnx: Path = typer.Option(..., "--onnx", help="The ONNX file to write."),
    calibration: str = typer.Option(None, "--calibration",
                                    help="none, temperature, platt or platt-ood (default: as made)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime's scores with cnnmod's."),
    overwrite: bool = OVERWRITE, as_json: bool = JSON,
) -> None:
    """Export a module or composition as one ONNX file: uint8 images in, scores p_c out."""
    from ..io.export import export_onnx

    result = export_onnx(paths, onnx, overwrite, check, calibration)
    emit(result, as_json, f"exported {onnx}")


@app.command()
def version() -> None:
    """Print the version."""
    sys.stdout.write(f"cnnmod {__version__}\n")
