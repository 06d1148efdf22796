"""CIFAR-10 and CIFAR-100 in their "python version" layout.

The batches are pickles; they are read with an unpickler that only admits plain containers and numpy
arrays, so a doctored batch cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import UserError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_batch(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"missing data file {path}; run `cnnmod data fetch` or point «data_root» at the folder")
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same user problem
        raise UserError(f"cannot read CIFAR batch {path}: {e}; the file is damaged, fetch it again")
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch (a dict was expected)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _need(batch: dict, key: str, path: Path):
    if key not in batch:
        raise UserError(f"CIFAR batch {path} has no '{key}' entry (found {sorted(batch)}); fetch the data set again")
    return batch[key]


def _images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(_need(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"CIFAR batch {path}: 'data' should be uint8 (N, 3072), found {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _names(meta_path: Path, key: str) -> list[str]:
    names = _need(load_batch(meta_path), key, meta_path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def sources(root: Path, hundred: bool) -> list[Path]:
    if hundred:
        d = root / CIFAR100_DIR
        files = [d / "train", d / "test", d / "meta"]
    else:
        d = root / CIFAR10_DIR
        files = [d / f for f in CIFAR10_TRAIN] + [d / "test_batch", d / "batches.meta"]
    for f in files:
        if not f.is_file():
            raise UserError(f"missing data file {f}; run `cnnmod data fetch` or point «data_root» at the folder")
    return files


def decode(root: Path, hundred: bool, coarse: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    if hundred:
        d = root / CIFAR100_DIR
        label_key = "coarse_labels" if coarse else "fine_labels"
        splits = {"train": [d / "train"], "test": [d / "test"]}
        names = _names(d / "meta", "coarse_label_names" if coarse else "fine_label_names")
    else:
        d = root / CIFAR10_DIR
        label_key = "labels"
        splits = {"train": [d / f for f in CIFAR10_TRAIN], "test": [d / "test_batch"]}
        names = _names(d / "batches.meta", "label_names")
    arrays = {}
    for split, paths in splits.items():
        xs, ys = [], []
        for p in paths:
            batch = load_batch(p)
            x = _images(batch, p)
            y = np.asarray(_need(batch, label_key, p), dtype=np.int64)
            if y.shape != (x.shape[0],):
                raise UserError(f"CIFAR batch {p}: {y.shape[0]} labels for {x.shape[0]} images")
            xs.append(x)
            ys.append(y)
        arrays[f"x_{split}"] = np.concatenate(xs)
        arrays[f"y_{split}"] = np.concatenate(ys)
    return arrays, names
