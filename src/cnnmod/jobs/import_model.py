"""Wrapping a user's state dict (safetensors, or a .pt read with ``weights_only=True``) into a model artifact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..artifacts import check_output
from ..core.metrics import evaluate_classifier
from ..data import load
from ..data.dataset import ImageSet
from ..data.transforms import InputSpec
from ..errors import UserError
from ..models.classifier import Classifier
from ..models.folder import save_model
from ..models.reference import trusting
from ..models.registry import create, load_weights
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


def input_spec(data: ImageSet, size: list[int] | None = None, mean: list[float] | None = None,
               std: list[float] | None = None, fit: str = "resize", crop: float = 0.875,
               channels: int | None = None) -> InputSpec:
    """What a model expects, as its user states it; what is not stated is ``data``'s own (its channels, size and
    normalisation)."""
    c, h, w = data.input_shape
    c = channels or (len(mean) if mean and len(mean) > 1 else c)  # three means: an RGB model
    h, w = size if size else (h, w)

    def own(values) -> tuple[float, ...]:  # the data's statistics, averaged where the channel count changes
        return tuple(values) if len(values) in (1, c) else (sum(values) / len(values),)

    mean, std = tuple(mean) if mean else own(data.mean), tuple(std) if std else own(data.std)
    try:
        return InputSpec(c, h, w, mean, std, fit, crop)
    except ValueError as e:
        raise UserError(f"the input spec is not valid: {e} («mean», «std», «fit», «crop»)")


def import_model(arch: str, weights: Path, data: str, out: Path, classes: list[int] | None = None,
                 arch_args: dict | None = None, run: Run | None = None, inputs: dict | None = None) -> dict:
    """``cnnmod import``: a user's state dict for a zoo architecture, a registered name or a reference
    ``package.module:callable``, as a model folder, evaluated on ``data``'s test split.
    ``inputs`` states the input the model expects (:func:`input_spec`'s keywords; by default the data's own)."""
    run = run or Run()
    check_output(Path(out), run.overwrite)
    train = load(data, "train", run.data_root, classes)
    test = load(data, "test", run.data_root, classes)
    spec = input_spec(train, **{k: v for k, v in (inputs or {}).items() if v is not None})
    with trusting(True):  # the user named the architecture
        name, args, net = create(arch, dict(arch_args or {}), spec.shape, train.num_classes)
    load_weights(net, read_state_dict(Path(weights)), name, weights)
    clf = Classifier(net, spec, train.class_names, name, args, data, train.source_classes,
                     {"imported_from": Path(weights).name})
    report = evaluate_classifier(clf, test, pick_device(run.device))
    clf.info["metrics"] = {"test_top1": report["top1"], "test_top5": report["top5"]}
    save_model(clf.cpu(), out, run.overwrite)
    return {"out": str(out), "arch": name, "arch_args": args, "input": spec.to_dict(), "data": data,
            "test_top1": report["top1"], "test_top5": report["top5"]}
