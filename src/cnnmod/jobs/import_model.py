"""Wrapping a user's state dict (safetensors, or a .pt read with ``weights_only=True``) into a model artifact."""

from __future__ import annotations

import re
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
from ..models.preprocessing import check_preprocessing, data_statistics
from ..models.reference import how_to_trust, trusting
from ..models.registry import create, load_weights
from ..progress import say
from ..runtime import pick_device
from .common import Run

# where a checkpoint keeps its weights, in the order tried (EMA weights first, as timm's loader takes them)
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "net", "weights")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights in a .safetensors file, or in a .pt/.pth file read with ``weights_only`` (no code runs): a state
    dict, or a checkpoint that holds one under a usual key (:data:`CHECKPOINT_KEYS`; a ``module.`` prefix, as
    DataParallel saves it, is dropped when the weights load)."""
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
        text = _ANSI.sub("", str(e))
        if "global" in text.lower() and ("unsupported" in text.lower() or "weights_only" in text.lower()):
            raise UserError(f"{path} holds a pickled object (a whole model?), not only tensors: cnnmod does not "
                            "unpickle it (that would run its code); save its weights with "
                            "torch.save(model.state_dict(), path) and import those")
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot read {path} as a state dict ({type(e).__name__}: {first[:160]}); save it with "
                        "torch.save(model.state_dict(), path) or as .safetensors")
    return weights_in(obj, path)


def weights_in(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in what ``torch.load`` gave: itself, or under the first of :data:`CHECKPOINT_KEYS` that
    holds one; otherwise one line naming the keys found."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        found = ", ".join(map(str, list(obj)[:8])) + (" ..." if len(obj) > 8 else "")
        raise UserError(f"{path} is a checkpoint without weights under a key cnnmod knows (found: {found}; tried: "
                        f"{', '.join(CHECKPOINT_KEYS)}): save the state dict itself with "
                        "torch.save(model.state_dict(), path)")
    raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors) but a "
                    f"{type(obj).__name__}: save it with torch.save(model.state_dict(), path)")


def input_spec(data: ImageSet, size: list[int] | None = None, mean: list[float] | None = None,
               std: list[float] | None = None, fit: str = "resize", crop: float = 0.875,
               channels: int | None = None) -> InputSpec:
    """What a model expects, as its user states it; what is not stated is ``data``'s own (its channels and size;
    the normalisation is checked by :func:`~cnnmod.models.preprocessing.check_preprocessing`, which refuses an
    unstated one)."""
    c, h, w = data.input_shape
    c = channels or (len(mean) if mean and len(mean) > 1 else c)  # three means: an RGB model
    h, w = size if size else (h, w)
    own_mean, own_std = data_statistics(data, c)
    mean, std = tuple(mean) if mean else own_mean, tuple(std) if std else own_std
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
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
    spec = input_spec(train, **inputs)
    with trusting(True):  # the user named the architecture
        name, args, net = create(arch, dict(arch_args or {}), spec.shape, train.num_classes)
    load_weights(net, read_state_dict(Path(weights)), name, weights)
    stated = "mean" in inputs and "std" in inputs
    check_preprocessing(net, spec if stated else None, train, "«mean» {mean} «std» {std}")
    clf = Classifier(net, spec, train.class_names, name, args, data, train.source_classes,
                     {"imported_from": Path(weights).name})
    report = evaluate_classifier(clf, test, pick_device(run.device))
    clf.info["metrics"] = {"test_top1": report["top1"], "test_top5": report["top5"]}
    save_model(clf.cpu(), out, run.overwrite)
    trust = how_to_trust(name)
    if trust:
        say(f"{out}: {trust}")
    return {"out": str(out), "arch": name, "arch_args": args, "input": spec.to_dict(), "data": data,
            "test_top1": report["top1"], "test_top5": report["top5"]}
