"""Model artifacts: a :class:`~cnnmod.models.classifier.Classifier` to and from its folder (config.json,
model.safetensors, README.md), weights verified against their checksum, never unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..artifacts import CONFIG, atomic_folder, read_artifact, read_config, write_into
from ..core.graph import ModelGraph
from ..data.transforms import InputSpec
from ..errors import UserError
from . import build
from .classifier import Classifier
from .reference import allows_code, how_to_trust
from .registry import load_weights


def model_card(clf: Classifier) -> str:
    metrics = clf.info.get("metrics", {})
    lines = [f"# {clf.arch} on {clf.dataset or 'custom data'}", "",
             f"A cnnmod model artifact: a {clf.num_classes}-class image classifier "
             f"for {clf.spec.channels}x{clf.spec.height}x{clf.spec.width} inputs.", "",
             f"- classes: {', '.join(clf.class_names[:20])}{' ...' if clf.num_classes > 20 else ''}"]
    for key, value in metrics.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Load it with `cnnmod.load_model(path)`; decompose it with `cnnmod decompose`."]
    trust = how_to_trust(clf.arch)
    lines += [f"Note: {trust}.", ""] if trust else [""]
    return "\n".join(lines)


def check_reloadable(clf: Classifier) -> None:
    """A model is saved only when its folder can be loaded again: its architecture is recorded."""
    if clf.arch == "custom":
        raise UserError(f"the model ({type(clf.net).__name__}) records no architecture, so its folder could not be "
                        "loaded again; wrap it with cnnmod.wrap(model, arch='package.module:callable', "
                        "arch_args={...}) or register its class with @cnnmod.register_arch")


def save_into(clf: Classifier, folder: Path, extra: dict | None = None) -> dict:
    check_reloadable(clf)
    config = {**clf.config(), **(extra or {})}
    config.pop("weights_sha256", None)
    return write_into(folder, "model", config, clf.net.state_dict(), model_card(clf))


def save_model(clf: Classifier, out: str | os.PathLike, overwrite: bool = False) -> dict:
    with atomic_folder(out, overwrite) as tmp:
        return save_into(clf, tmp)


@allows_code
def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Classifier:
    """The classifier in a model artifact folder, weights verified against their checksum."""
    config, tensors = read_artifact(path, "model")
    arch, spec = checked_arch(config, path), checked_input(config, path)
    net = build(arch["name"], spec.shape, len(config["class_names"]), **arch.get("args", {}))
    load_weights(net, tensors, arch["name"], Path(path))
    info = {k: v for k, v in config.items()
            if k not in ("arch", "input", "class_names", "dataset", "source_classes", "format_version", "kind")}
    clf = Classifier(net, spec, config["class_names"], arch["name"], arch.get("args", {}), config.get("dataset", ""),
                     config.get("source_classes"), info)
    return clf.to(map_location).eval()


def checked_arch(config: dict, path) -> dict:
    """The config's architecture, or a one-line error where it is not ``{"name": str, "args": {...}}``."""
    arch = config.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or \
            not isinstance(arch.get("args", {}), dict):
        raise UserError(f"{path}/config.json is malformed: 'arch' must be an object with a 'name' string and an "
                        f"'args' object, got {json.dumps(arch)[:60]}")
    if not isinstance(config.get("class_names"), list) or len(config["class_names"]) < 2:
        raise UserError(f"{path}/config.json is malformed: 'class_names' must be a list of at least 2 names")
    return arch


def checked_input(config: dict, path) -> InputSpec:
    """The config's input spec, or a one-line error naming what is wrong with it."""
    try:
        return InputSpec.from_dict(config["input"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}/config.json is malformed: 'input' must give channels, height, width, mean and "
                        f"std ({type(e).__name__}: {e})")


class SourceCache:
    """Loads each source model once, so modules of one model share it (and compose in one batched pass)."""

    def __init__(self) -> None:
        self.models: dict[Path, tuple[Classifier, ModelGraph]] = {}

    def get(self, path: Path, sha: str, device: torch.device | str) -> tuple[Classifier, ModelGraph]:
        path = path.resolve()
        if path not in self.models:
            if not (path / CONFIG).is_file():
                raise UserError(f"the module's source model is not at {path}; copy the source model folder with "
                                "the module (keep their relative places)")
            config = read_config(path, "model")
            if config.get("weights_sha256") != sha:
                raise UserError(f"the source model at {path} is not the one the module was made from (its weights "
                                "sha256 differs); give the module its own source model")
            clf = load_model(path, device)
            self.models[path] = (clf, ModelGraph(clf.net, clf.spec.shape))
        return self.models[path]
