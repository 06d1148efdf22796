"""Decoding image files with Pillow into uint8 (C, H, W) arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (none when it is not a folder)."""
    return sorted(p for p in folder.iterdir() if is_image(p)) if folder.is_dir() else []


def read_image(path: Path, mode: str) -> np.ndarray:
    """The image at ``path`` in Pillow ``mode`` ("L" or "RGB") as uint8 (C, H, W)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}; remove or replace the file")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def stack_images(paths: list[Path], mode: str) -> np.ndarray:
    """All images as one uint8 (N, C, H, W) array; they must share one size."""
    arrays = [read_image(p, mode) for p in paths]
    first = arrays[0].shape
    for p, a in zip(paths, arrays, strict=True):
        if a.shape != first:
            raise UserError(
                f"images differ in size: {paths[0]} is {first[2]}x{first[1]}, {p} is {a.shape[2]}x{a.shape[1]}; "
                "resize them to one size first"
            )
    return np.stack(arrays)
