"""``npz:PATH``: a NumPy archive with ``x_train, y_train, x_test, y_test`` (and optionally ``class_names``).

Images may be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; uint8, or floats in [0, 1].
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise UserError(f"{path}: {key} has shape {x.shape}; "
                        "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
            raise UserError(f"{path}: {key} holds floats outside [0, 1]; store uint8 or scale to [0, 1]")
        return np.round(x * 255).astype(np.uint8)
    raise UserError(f"{path}: {key} has dtype {x.dtype}; store uint8 images or floats in [0, 1]")


def sources(path: Path) -> list[Path]:
    if not path.is_file():
        raise UserError(f"no such file {path}; give npz:PATH to an archive with {', '.join(KEYS)}")
    return [path]


def decode(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; it needs arrays {', '.join(KEYS)}")
            raw = {k: f[k] for k in KEYS}
            names = [str(n) for n in f["class_names"]] if "class_names" in f.files else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; it must be an uncorrupted .npz written by numpy.savez")
    arrays = {}
    for split in ("train", "test"):
        x = _images(raw[f"x_{split}"], path, f"x_{split}")
        y = raw[f"y_{split}"]
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: y_{split} should be {x.shape[0]} integer labels, found {y.dtype} {y.shape}")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"{path}: train images are {arrays['x_train'].shape[1:]} "
                        f"but test images {arrays['x_test'].shape[1:]}")
    if names is None:
        top = int(max(arrays["y_train"].max(initial=-1), arrays["y_test"].max(initial=-1)))
        names = [str(i) for i in range(top + 1)]
    return arrays, names
