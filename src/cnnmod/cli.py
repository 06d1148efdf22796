"""The ``cnnmod`` command: a thin layer over the library.

Every command takes ``--json`` (one JSON object on stdout, nothing else there); human output, progress bars
and logs go to stderr. A mistake the user can fix prints one line and exits with status 2.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import typer

from . import __version__
from .errors import UserError
from .progress import console
from .runtime import leave_together, shutdown_distributed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decompose trained CNN classifiers into reusable, replaceable per-class modules.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and download data sets.")
app.add_typer(data_app, name="data")

JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
SEED = typer.Option(0, "--seed", help="Random seed; the same seed gives the same result.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
DATA_ROOT = typer.Option(None, "--data-root",
                         help="Folder holding the data sets (default: $CNNMOD_DATA or the cache).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace the output folder if it exists.")
COUNTRY = typer.Option(None, "--country", help="Country for the carbon intensity, ISO 3166-1 alpha-3 (default: "
                       "$CNNMOD_COUNTRY or USA).")
ARCH_ARG = typer.Option([], "--arch-arg", help="Architecture option KEY=VALUE: width=32, stem=cifar, hidden=49,49.")


def emit(result: dict, as_json: bool, title: str = "") -> None:
    """One JSON object on stdout, or a readable table on stderr (from torchrun's first process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in result.items():
        if not isinstance(value, (list, dict)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    for key, value in result.items():  # lists of records (per-class accuracy, epochs) as tables of their own
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # nested fields (a slim module's pruning history) do not read in a cell: named under the table
            nested = [c for c in value[0] if any(isinstance(v.get(c), (list, dict)) for v in value)]
            rows = Table(title=key, caption=f"{', '.join(nested)}: with --json" if nested else None)
            columns = [c for c in value[0] if c not in nested]
            for c in columns:
                rows.add_column(c)
            for v in value:
                rows.add_row(*(f"{v.get(c):.4g}" if isinstance(v.get(c), float) else str(v.get(c)) for c in columns))
            console.print(rows)


def parse_size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--input-size {text!r} is not HEIGHTxWIDTH (e.g. 28x28)")
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--input-size {text!r} is not HEIGHTxWIDTH (e.g. 28x28)")
    return size


def parse_arch_args(items: list[str], bn: bool | None) -> dict:
    args: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--arch-arg {item!r} is not KEY=VALUE (e.g. width=32)")
        value: object
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif "," in raw:
            try:
                value = [int(v) for v in raw.split(",") if v]
            except ValueError:
                raise UserError(f"--arch-arg {item!r}: a list must be integers separated by commas")
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        if key == "hidden" and isinstance(value, int):
            value = [value]
        args[key] = value
    if bn is not None:
        args["bn"] = bn
    return args


@app.command()
def train(
    arch: str = typer.Option(..., "--arch", help="Architecture: resnet20/32/56, resnet18/34/50, vgg11/16, mlp, cnn, "
                             "a registered name, or your own network: package.module:callable."),
    data: list[str] = typer.Option(..., "--data", help="Data set name, e.g. fashion-mnist, cifar10, folder:PATH; "
                                   "repeat it to train on several (--data fashion-mnist:0,3 --data digits:7)."),
    out: Path = typer.Option(..., "--out",
                             help="Output model folder (best-validation checkpoint; last epoch in last/)."),
    input_size: str = typer.Option(None, "--input-size", help="Resize images to HEIGHTxWIDTH, e.g. 28x28."),
    epochs: int = typer.Option(15, "--epochs"),
    classes: str = typer.Option(None, "--classes", help="Train on these classes only, e.g. 0,3,7 (relabelled 0..k-1)."),
    subset: int = typer.Option(None, "--subset", help="Use only N training images (seeded)."),
    val_split: float = typer.Option(0.1, "--val-split", help="Fraction of training images held out for validation."),
    batch_size: int = typer.Option(128, "--batch-size", help="Batch size per process."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: sgd 0.1, adam 0.001)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adam."),
    weight_decay: float = typer.Option(None, "--weight-decay"),
    augment: bool = typer.Option(True, "--augment/--no-augment",
                                 help="Random crop (and flip where it suits the data)."),
    balanced: bool = typer.Option(False, "--balanced", help="Draw each epoch's images class-balanced and keep the "
                                  "checkpoint of best balanced validation accuracy (for imbalanced data)."),
    bn: bool = typer.Option(None, "--bn/--no-bn", help="BatchNorm on or off (architectures that have it)."),
    arch_arg: list[str] = ARCH_ARG,
    resume: bool = typer.Option(False, "--resume", help="Go on from OUT.resume, the last epoch finished by a run of "
                                "the same settings that stopped (kept after every epoch); without one, start."),
    seed: int = SEED, device: str = DEVICE, data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE,
    country: str = COUNTRY, as_json: bool = JSON,
) -> None:
    """Train a model from scratch, keeping the best-validation checkpoint (and the last epoch); resumable."""
    from .data import parse_class_list
    from .jobs.train import train_dir
    from .models.train import TrainSettings

    data = "+".join(data)
    settings = TrainSettings(arch=arch, data=data, arch_args=parse_arch_args(arch_arg, bn),
                             input_size=parse_size(input_size),
                             classes=parse_class_list(classes), subset=subset, val_split=val_split, epochs=epochs,
                             batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                             augment=augment, balanced=balanced, seed=seed, device=device, data_root=data_root)
    result = train_dir(settings, out, overwrite, country, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        result.pop("model")
        emit(result, as_json, f"trained {arch} on {data}")


@app.command("evaluate-model")
def evaluate_model(
    model_dir: Path = typer.Argument(..., help="A model folder."),
    data: str = typer.Option(None, "--data", help="Data set (default: the one the model was trained on)."),
    resize: bool = typer.Option(False, "--resize", help="Resize images whose shape differs from the model's input."),
    batch_size: int = typer.Option(512, "--batch-size"),
    device: str = DEVICE, data_root: str = DATA_ROOT, as_json: bool = JSON,
) -> None:
    """Top-1, top-5 and per-class accuracy of a model on a test set."""
    from .jobs.common import Run
    from .jobs.evaluate import evaluate_model_dir

    result = evaluate_model_dir(model_dir, data, resize, Run(device, data_root, batch_size))
    emit(result, as_json, f"{model_dir} on {result['data']}")


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not numbers separated by commas (e.g. 0.485,0.456,0.406)")


@app.command("import")
def import_weights(
    arch: str = typer.Option(..., "--arch", help="A zoo name (resnet50, mobilenet_v2, ...), a name registered with "
                             "@cnnmod.register_arch, or your own network: package.module:callable."),
    weights: Path = typer.Option(..., "--weights",
                                 help="A state dict: .safetensors, or .pt/.pth (read with weights_only)."),
    data: str = typer.Option(..., "--data",
                             help="The data set the weights were trained on (classes, input, normalisation)."),
    out: Path = typer.Option(..., "--out"),
    classes: str = typer.Option(None, "--classes", help="The classes the weights were trained on, if a subset."),
    bn: bool = typer.Option(None, "--bn/--no-bn"),
    arch_arg: list[str] = ARCH_ARG,
    input_size: str = typer.Option(None, "--input-size", help="The input the model expects, HEIGHTxWIDTH "
                                   "(default: the data's size)."),
    channels: int = typer.Option(None, "--channels", help="Input channels the model expects (default: the data's)."),
    mean: str = typer.Option(None, "--mean", help="Normalisation mean per channel, in [0, 1] units, e.g. "
                             "0.485,0.456,0.406 (default: the data's own)."),
    std: str = typer.Option(None, "--std", help="Normalisation std per channel (default: the data's own)."),
    fit: str = typer.Option("resize", "--fit", help="How other images are brought to the input size: resize, or "
                            "center-crop (shorter side to size/crop, then the centre, as ImageNet models are "
                            "evaluated)."),
    crop: float = typer.Option(0.875, "--crop", help="The crop ratio of --fit center-crop (224/256)."),
    data_root: str = DATA_ROOT, device: str = DEVICE, overwrite: bool = OVERWRITE, as_json: bool = JSON,
) -> None:
    """Wrap a user's state dict into a model artifact (evaluated on the data set's test split)."""
    from .data import parse_class_list
    from .jobs.common import Run
    from .jobs.import_model import import_model

    inputs = {"size": parse_size(input_size), "mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std"),
              "fit": fit, "crop": crop, "channels": channels}
    result = import_model(arch, weights, data, out, parse_class_list(classes), parse_arch_args(arch_arg, bn),
                          Run(device, data_root, overwrite=overwrite), inputs)
    emit(result, as_json, f"imported {weights}")


@app.command("decompose")
def decompose_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A model folder (cnnmod train or cnnmod import made it)."),
    out: Path = typer.Option(..., "--out", help="Output decomposition folder: the model once, one folder per module."),
    data: str = typer.Option(None, "--data", help="Data set to observe (default: the one the model was trained on)."),
    variant: str = typer.Option("mc-bln", "--variant", help="mc, mc-bln (the paper's choice) or mc-bi."),
    classes: str = typer.Option(None, "--classes", help="Decompose only these classes, e.g. 0,3,7."),
    ci_samples: int = typer.Option(1000, "--ci-samples", help="Training inputs observed per class."),
    correct_only: bool = typer.Option(False, "--correct-only", help="Observe only inputs the model gets right."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Switch nodes off only where a ReLU follows "
                                    "(pre-activation networks: a 0 before an addition or BatchNorm is not "
                                    "inactive)."),
    relative_delta: bool = typer.Option(False, "--relative-delta", help="MC-BLN's --delta in units of the weights "
                                        "it is compared with (their root mean square), not absolute."),
    tau: float = typer.Option(0.0, "--tau", help="Keep a node active for at least this rate of its class (0: paper)."),
    delta: float = typer.Option(0.5, "--delta", help="MC-BLN's weight threshold."),
    condition: str = typer.Option("pseudocode", "--condition",
                                  help="MC-BLN's marking rule: pseudocode (default) or prose."),
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
                                    "about half of its training); the slim flags given beside it override it."),
    calibration_samples: int = typer.Option(100, "--calibration-samples",
                                            help="Held-out training inputs per class to fit score calibration."),
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Record each module's binary accuracy on the test split."),
    batch_size: int = typer.Option(256, "--batch-size"),
    seed: int = SEED, device: str = DEVICE, data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE,
    country: str = COUNTRY, as_json: bool = JSON,
) -> None:
    """Decompose a model into one binary module per class (Pan & Rajan's CI + TI + MC)."""
    from .data import parse_class_list
    from .jobs.common import Run
    from .jobs.decompose import decompose_dir
    from .node.method import DecomposeSettings
    from .slim.config import SlimSettings

    settings = DecomposeSettings(variant=variant, delta=delta, condition=condition, ci_samples=ci_samples,
                                 correct_only=correct_only, tau=tau, seed=seed, exact_only=exact_only,
                                 relative_delta=relative_delta,
                                 calibration_samples=calibration_samples)
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
    from .jobs.common import Run
    from .jobs.evaluate import EvaluateSettings, evaluate_dir

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
    from .jobs.common import Run
    from .jobs.compose import ComposeSettings, compose_dirs

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
    from .jobs.common import Run
    from .jobs.compose import replace_dir

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
    from .jobs.common import Run
    from .jobs.compose import remove_dir

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
    from .artifacts import write_json
    from .experiments.presets import preset as get_preset
    from .experiments.report import write_report
    from .experiments.study import Study

    study = Study(out, get_preset(preset), data, second_data, country, seed, device, data_root, resume)
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
    from .io.export import export_onnx

    result = export_onnx(paths, onnx, overwrite, check, calibration)
    emit(result, as_json, f"exported {onnx}")


@data_app.command("info")
def data_info(name: str = typer.Argument(...), data_root: str = DATA_ROOT, as_json: bool = JSON) -> None:
    """Classes, sizes, input shape and folder of a data set."""
    from .data import info

    result = info(name, data_root)
    emit(result, as_json, name)
    if not as_json:
        console.print("classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(result["class_names"][:20])))


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(...), data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE,
    mirror: str = typer.Option(None, "--mirror", help="Base URL to download from instead of the official one."),
    as_json: bool = JSON,
) -> None:
    """Download a data set from its official address, verify its checksums and unpack it."""
    from .data import data_root_path
    from .data.fetch import fetch

    folder = fetch(name, data_root_path(data_root), mirror=mirror, overwrite=overwrite)
    emit({"name": name, "folder": str(folder)}, as_json, f"fetched {name}")


@app.command()
def version() -> None:
    """Print the version."""
    sys.stdout.write(f"cnnmod {__version__}\n")


TRUST_CODE = "--trust-code"  # anywhere on the line: artifacts may import the code their architecture names
SKIP_BAD_IMAGES = "--skip-bad-images"  # anywhere on the line: streamed splits leave unreadable images out


def main(argv: list[str] | None = None) -> int:
    from .data.stream import skipping_bad_images
    from .models.reference import trusting

    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if argv is None else argv)
    trust, skip = TRUST_CODE in argv, SKIP_BAD_IMAGES in argv
    argv = [a for a in argv if a not in (TRUST_CODE, SKIP_BAD_IMAGES)]
    try:
        with trusting(trust), skipping_bad_images(skip):
            rc = command.main(args=argv, prog_name="cnnmod", standalone_mode=False)
        leave_together()  # under torchrun: no rank tears down its connections while another still works
    except UserError as e:
        sys.stderr.write(f"cnnmod: error: {e}\n")
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(e.filename or ".")
        while not where.exists() and where != where.parent:  # the half-written folder is gone: name its disk
            where = where.parent
        sys.stderr.write(f"cnnmod: error: the disk is full ({e.strerror}, writing under {where}): free some space "
                         "and run again; nothing half-written was left behind\n")
        return 2
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("cnnmod: interrupted\n")
        return 130
    except typer.TyperException as e:  # usage errors: typer prints them with the command's help hint
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"cnnmod: error: {e}\n")
        return int(getattr(e, "exit_code", 2))
    finally:
        shutdown_distributed()
    return rc if isinstance(rc, int) else 0


def run() -> None:
    sys.exit(main())
