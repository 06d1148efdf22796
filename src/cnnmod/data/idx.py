"""IDX files (MNIST, Fashion-MNIST), gzipped or not, with magic number, dtype and dimensions checked."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import UserError

# IDX type codes -> numpy dtypes (big-endian), from the format's definition.
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_file(root: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` under ``root``; a user error naming both when neither exists."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing data file {root / stem}(.gz); run `cnnmod data fetch` or point «data_root» at the folder")


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; the file is damaged, fetch it again")
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(f"{path} is not an IDX file (wrong magic number); fetch the data set again")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise UserError(f"{path}: unknown IDX type code 0x{code:02x}; fetch the data set again")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UserError(f"{path}: IDX header is truncated; fetch the data set again")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(
            f"{path}: holds {len(data) - header} bytes of data but its header {dims} needs {expected}; "
            "the file is truncated or damaged, fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def sources(root: Path) -> list[Path]:
    return [find_file(root, stem) for pair in FILES.values() for stem in pair]


def decode(root: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images = read_idx(find_file(root, images_stem))
        labels = read_idx(find_file(root, labels_stem))
        if images.ndim != 3 or images.dtype != np.uint8:
            raise UserError(f"{root}: {images_stem} should hold uint8 images (N, H, W), "
                            f"found {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise UserError(f"{root}: {labels_stem} has {labels.shape} labels for {images.shape[0]} images")
        arrays[f"x_{split}"] = images[:, None]
        arrays[f"y_{split}"] = labels.astype(np.int64)
    return arrays
