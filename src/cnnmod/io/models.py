"""Model artifacts: a :class:`~cnnmod.models.classifier.Classifier` to and from its folder (config.json,
model.safetensors, README.md), weights verified against their checksum, never unpickled."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..data.transforms import InputSpec
from ..errors import UserError
from ..models import build
from ..models.classifier import Classifier
from .artifacts import atomic_folder, read_artifact, write_into


def model_card(clf: Classifier) -> str:
    metrics = clf.info.get("metrics", {})
    lines = [f"# {clf.arch} on {clf.dataset or 'custom data'}", "",
             f"A cnnmod model artifact: a {clf.num_classes}-class image classifier "
             f"for {clf.spec.channels}x{clf.spec.height}x{clf.spec.width} inputs.", "",
             f"- classes: {', '.join(clf.class_names[:20])}{' ...' if clf.num_classes > 20 else ''}"]
    for key, value in metrics.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Load it with `cnnmod.load_model(path)`; decompose it with `cnnmod decompose`.", ""]
    return "\n".join(lines)


def save_into(clf: Classifier, folder: Path, extra: dict | None = None) -> dict:
    config = {**clf.config(), **(extra or {})}
    config.pop("weights_sha256", None)
    return write_into(folder, "model", config, clf.net.state_dict(), model_card(clf))


def save_model(clf: Classifier, out: str | os.PathLike, overwrite: bool = False) -> dict:
    with atomic_folder(out, overwrite) as tmp:
        return save_into(clf, tmp)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Classifier:
    """The classifier in a model artifact folder, weights verified against their checksum."""
    config, tensors = read_artifact(path, "model")
    arch = config.get("arch", {})
    spec = InputSpec.from_dict(config["input"])
    net = build(arch.get("name", "?"), spec.shape, len(config["class_names"]), **arch.get("args", {}))
    load_weights(net, tensors, arch.get("name", "?"), Path(path))
    info = {k: v for k, v in config.items()
            if k not in ("arch", "input", "class_names", "dataset", "source_classes", "format_version", "kind")}
    clf = Classifier(net, spec, config["class_names"], arch["name"], arch.get("args", {}), config.get("dataset", ""),
                     config.get("source_classes"), info)
    return clf.to(map_location).eval()


def load_weights(net: nn.Module, tensors: dict[str, torch.Tensor], arch: str, source: Path | str) -> None:
    """Load a state dict strictly; a mismatch is a user error naming what does not fit."""
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {tuple(tensors[k].shape)} but {arch} needs {tuple(expected[k].shape)}")
        raise UserError(f"the weights in {source} are not a {arch} for this input and class count "
                        f"({'; '.join(parts)}); check --arch, --data and the architecture options")
    net.load_state_dict(tensors, strict=True)
