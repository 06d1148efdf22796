"""``cnnmod decompose``, ``evaluate``, ``compose``, ``replace``, ``remove``, ``reproduce``, ``export`` and
``version``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from .. import __version__
from .app import (
    BATCH_SIZE,
    COUNTRY,
    DATA_ROOT,
    DEVICE,
    EVERY_COMMAND,
    JSON,
    OVERWRITE,
    SEED,
    SET,
    app,
    emit,
    parse_set,
)


@app.command("decompose", epilog=EVERY_COMMAND)
def decompose_cmd(
    model: Path = typer.Argument(..., help="A model folder (cnnmod train or cnnmod import made it)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder: the model once, one folder per "
                             "module."),
    data: str = typer.Option(None, "--data", metavar="NAME", help="Data set to observe (default: the model's own)."),
    classes: str = typer.Option(None, "--classes", metavar="LIST", help="Only these classes, by index or name: "
                                "0,3,7 or T-shirt/top,Dress (default: all)."),
    granularity: str = typer.Option(None, "--granularity", metavar="node|channel",
                                    help="node: the paper's masks over the model; channel: slim modules, "
                                    "physically smaller networks (default: node where the model's activations "
                                    "are ReLU-family, else channel)."),
    variant: str = typer.Option(None, "--variant", metavar="mc|mc-bln|mc-bi", help="Node-level: the paper's "
                                "variant (default mc-bln)."),
    size: float = typer.Option(None, "--size", metavar="F", help="Channel: the modules' mean share of the model's "
                               "parameters, one budget shared by all classes (default 0.5; below 0.5 the slower "
                               "small recipe)."),
    max_loss: float = typer.Option(None, "--max-loss", metavar="PP", help="Channel: the smallest module losing at "
                                   "most this many points of binary accuracy (--size is then a floor)."),
    recipe: str = typer.Option(None, "--recipe", metavar="NAME", help="best (default: the best measured; for slim "
                               "modules cheap at --size 0.5 and above, small below), paper (the paper's settings), "
                               "cheap or small (slim)."),
    settings: list[str] = SET,
    resume: bool = typer.Option(False, "--resume", help="Go on from OUT.resume, the parts finished by a run of "
                                "the same settings that stopped."),
    batch_size: int = BATCH_SIZE, seed: int = SEED, device: str = DEVICE, overwrite: bool = OVERWRITE,
    as_json: bool = JSON, data_root: str = DATA_ROOT, country: str = COUNTRY,
) -> None:
    """Decompose a model into one binary module per class, with the best measured settings."""
    from ..jobs.common import Run
    from ..jobs.decompose import decompose_dir, plan_for

    plan = plan_for(granularity, recipe, variant, size, max_loss, seed, parse_set(settings))
    result = decompose_dir(model, out, plan, Run(device, data_root, batch_size, overwrite, country), data=data,
                           classes=classes, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result, as_json, f"decomposed {model} into {out}")


@app.command("evaluate", epilog=EVERY_COMMAND)
def evaluate_cmd(
    paths: list[Path] = typer.Argument(..., help="A decomposition or composition folder, or module folders."),
    data: str = typer.Option(None, "--data", help="Test data for one model's modules (default: its data set)."),
    calibration: str = typer.Option(None, "--calibration",
                                    help="none, temperature, platt or platt-ood (default: the "
                                    "composition's own)."),
    mode: str = typer.Option(None, "--mode", help="vote, merged or fused (default: the composition's own)."),
    cost: bool = typer.Option(True, "--cost/--no-cost", help="Measure parameters, FLOPs and latency too."),
    latency_batch: int = typer.Option(64, "--latency-batch", metavar="N", help="Batch size of the latency "
                                      "measurement."),
    batch_size: int = typer.Option(512, "--batch-size", metavar="N", help="Images per batch."),
    device: str = DEVICE, as_json: bool = JSON, data_root: str = DATA_ROOT, country: str = COUNTRY,
) -> None:
    """Composed modules on their classes' test images: top-1/top-5 and per-class accuracy; for one model's
    modules also the model on the same images, the decomposition cost and Jaccard indices."""
    from ..jobs.common import Run
    from ..jobs.evaluate import EvaluateSettings, evaluate_dir

    result = evaluate_dir(paths, EvaluateSettings(data, calibration, mode, cost, latency_batch),
                          Run(device, data_root, batch_size, country=country))
    emit(result, as_json, "model vs composed modules")


@app.command("compose", epilog=EVERY_COMMAND)
def compose_cmd(
    paths: list[Path] = typer.Argument(None, help="Module folders; a decomposition or composition folder stands "
                                       "for all its modules, DIR:0,6 for those of classes 0 and 6. Modules may come "
                                       "from several models and data sets."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output composition folder."),
    mode: str = typer.Option(None, "--mode", metavar="vote|merged|fused", help="vote: a pass per module (the "
                             "paper); merged: one model's modules as one network, one pass; fused: one merged "
                             "network per model (default: merged for one model's modules, else vote)."),
    calibration: str = typer.Option(None, "--calibration", metavar="NAME", help="none (the paper), temperature, "
                                    "platt or platt-ood (default: none for one model's modules, platt for several "
                                    "models', platt-ood for several data sets')."),
    size: float = typer.Option(None, "--size", metavar="F", help="Merged slim compositions: prune the network "
                               "further, for its own classes, to this share of the model's parameters."),
    max_loss: float = typer.Option(None, "--max-loss", metavar="PP", help="Merged slim compositions: prune as far "
                                   "as top-1 among its classes stays within this many points of the model's."),
    continuous_learning: bool = typer.Option(False, "--continuous-learning",
                                             help="Modules relearn the other data sets' classes (no training)."),
    refit_heads: bool = typer.Option(False, "--refit-heads", help="Refit each node-level module's two-way head on "
                                     "the composition's classes (no network weight changes)."),
    settings: list[str] = SET,
    batch_size: int = BATCH_SIZE, device: str = DEVICE, overwrite: bool = OVERWRITE, as_json: bool = JSON,
    data_root: str = DATA_ROOT, country: str = COUNTRY,
) -> None:
    """Reuse: compose modules into a new classifier over their classes."""
    from ..errors import UserError
    from ..jobs.common import Run
    from ..jobs.compose import ComposeSettings, compose_dirs
    from ..recipes import parse_setting
    from ..slim.config import SlimSettings

    if not paths:
        raise UserError("nothing to compose: give module folders, a decomposition folder or DIR:0,6 (its classes 0 "
                        "and 6), e.g. cnnmod compose runs/fm-slim:0,6 --out runs/pair")
    pruning = {k: parse_setting(SlimSettings, k, v) for k, v in parse_set(settings).items()}
    s = ComposeSettings(continuous_learning, refit_heads, calibration, mode, size, max_loss, pruning)
    result = compose_dirs(paths, out, s, Run(device, data_root, batch_size, overwrite, country))
    emit(result, as_json, f"composed {len(result['classes'])} modules into {out}")


@app.command("replace", epilog=EVERY_COMMAND)
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


@app.command("remove", epilog=EVERY_COMMAND)
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


@app.command("reproduce", epilog=EVERY_COMMAND)
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


@app.command("export", epilog=EVERY_COMMAND)
def export_cmd(
    paths: list[Path] = typer.Argument(..., help="A module, decomposition or composition folder (or several)."),
    onnx: Path = typer.Option(..., "--onnx", help="The ONNX file to write."),
    calibration: str = typer.Option(None, "--calibration",
                                    help="none, temperature, platt or platt-ood (default: as made)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime's scores with cnnmod's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the ONNX file if it exists."),
    as_json: bool = JSON,
) -> None:
    """Export a module or composition as one ONNX file: uint8 images in, scores p_c out."""
    from ..io.export import export_onnx

    result = export_onnx(paths, onnx, overwrite, check, calibration)
    emit(result, as_json, f"exported {onnx}")


@app.command()
def version() -> None:
    """Print the version."""
    sys.stdout.write(f"cnnmod {__version__}\n")
