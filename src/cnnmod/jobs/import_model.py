"""Wrapping a user's state dict (safetensors, or a .pt read with ``weights_only=True``) into a model artifact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.metrics import evaluate_classifier
from ..data import load
from ..data.transforms import InputSpec
from ..errors import UserError
from ..io.artifacts import check_output
from ..io.models import load_weights, save_model
from ..models import build
from ..models.classifier import Classifier
from ..runtime import pick_device
from .common import Run


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"no such weights file {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} as safetensors: {e}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or damage is the same user problem
        raise UserError(f"cannot read {path} as a state dict ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "save it with torch.save(model.state_dict(), path) or as .safetensors")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def import_model(arch: str, weights: Path, data: str, out: Path, classes: list[int] | None = None,
                 arch_args: dict | None = None, run: Run | None = None) -> dict:
    """``cnnmod import``: a user's state dict for a zoo architecture, as a model folder, evaluated on ``data``'s
    test split."""
    run, arch_args = run or Run(), dict(arch_args or {})
    check_output(Path(out), run.overwrite)
    train = load(data, "train", run.data_root, classes)
    test = load(data, "test", run.data_root, classes)
    spec = InputSpec(*train.input_shape, train.mean, train.std)
    net = build(arch, spec.shape, train.num_classes, **arch_args)
    load_weights(net, read_state_dict(Path(weights)), arch, weights)
    clf = Classifier(net, spec, train.class_names, arch, arch_args, data, train.source_classes,
                     {"imported_from": Path(weights).name})
    report = evaluate_classifier(clf, test, pick_device(run.device))
    clf.info["metrics"] = {"test_top1": report["top1"], "test_top5": report["top5"]}
    save_model(clf.cpu(), out, run.overwrite)
    return {"out": str(out), "arch": arch, "data": data, "test_top1": report["top1"], "test_top5": report["top5"]}
