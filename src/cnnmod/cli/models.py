"""``cnnmod train``, ``evaluate-model`` and ``import``: models in and out."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from .app import (
    ARCH_ARG,
    COUNTRY,
    DATA_ROOT,
    DEVICE,
    EVERY_COMMAND,
    JSON,
    OVERWRITE,
    SEED,
    app,
    class_list,
    emit,
    parse_arch_args,
    parse_floats,
    parse_size,
)


@app.command(epilog=EVERY_COMMAND)
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
    from ..jobs.train import train_dir
    from ..models.train import TrainSettings

    data = "+".join(data)
    settings = TrainSettings(arch=arch, data=data, arch_args=parse_arch_args(arch_arg, bn),
                             input_size=parse_size(input_size),
                             classes=class_list(classes, data, data_root), subset=subset, val_split=val_split,
                             epochs=epochs,
                             batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                             augment=augment, balanced=balanced, seed=seed, device=device, data_root=data_root)
    result = train_dir(settings, out, overwrite, country, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        result.pop("model")
        emit(result, as_json, f"trained {arch} on {data}")


@app.command("evaluate-model", epilog=EVERY_COMMAND)
def evaluate_model(
    model_dir: Path = typer.Argument(..., help="A model folder."),
    data: str = typer.Option(None, "--data", help="Data set (default: the one the model was trained on)."),
    resize: bool = typer.Option(False, "--resize", help="Resize images whose shape differs from the model's input."),
    batch_size: int = typer.Option(512, "--batch-size"),
    device: str = DEVICE, data_root: str = DATA_ROOT, as_json: bool = JSON,
) -> None:
    """Top-1, top-5 and per-class accuracy of a model on a test set."""
    from ..jobs.common import Run
    from ..jobs.evaluate import evaluate_model_dir

    result = evaluate_model_dir(model_dir, data, resize, Run(device, data_root, batch_size))
    emit(result, as_json, f"{model_dir} on {result['data']}")


@app.command("import", epilog=EVERY_COMMAND)
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
    mean: str = typer.Option(None, "--mean", help="The normalisation the weights were trained with: mean per "
                             "channel in [0, 1] units, e.g. 0.485,0.456,0.406; 0 with --std 1 for [0, 1] inputs "
                             "(ToTensor alone). Checked on the training images; without it cnnmod names the one "
                             "that fits."),
    std: str = typer.Option(None, "--std", help="The normalisation's std per channel, e.g. 0.229,0.224,0.225."),
    fit: str = typer.Option("resize", "--fit", help="How other images are brought to the input size: resize, or "
                            "center-crop (shorter side to size/crop, then the centre, as ImageNet models are "
                            "evaluated)."),
    crop: float = typer.Option(0.875, "--crop", help="The crop ratio of --fit center-crop (224/256)."),
    data_root: str = DATA_ROOT, device: str = DEVICE, overwrite: bool = OVERWRITE, as_json: bool = JSON,
) -> None:
    """Wrap a user's state dict into a model artifact (evaluated on the data set's test split)."""
    from ..jobs.common import Run
    from ..jobs.import_model import import_model

    inputs = {"size": parse_size(input_size), "mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std"),
              "fit": fit, "crop": crop, "channels": channels}
    result = import_model(arch, weights, data, out, class_list(classes, data, data_root), parse_arch_args(arch_arg, bn),
                          Run(device, data_root, overwrite=overwrite), inputs)
    emit(result, as_json, f"imported {weights}")
