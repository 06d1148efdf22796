"""``folder:PATH``: one sub-folder per class of image files.

With ``PATH/train`` and ``PATH/test`` (or ``PATH/val``) those are the splits; otherwise every image is read
and a fixed 20% of each class (chosen with seed 0) becomes the test split. Images are read as RGB unless
every one of them is greyscale. A split of more than ``cnnmod.data.stream.STREAM_ABOVE`` (50,000) images
is streamed (:mod:`cnnmod.data.stream`): stored at its first training image's size and mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .images import image_files, stack_images

TEST_FRACTION = 0.2


def _mode(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return im.mode
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}; remove or replace the file")


def _class_folders(d: Path) -> list[Path]:
    folders = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{d} has no class sub-folders; put each class's images in a folder named after the class")
    return folders


def _listing(d: Path, names: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for i, name in enumerate(names):
        folder = d / name
        files = image_files(folder)
        if not files:
            raise UserError(f"class folder {folder} holds no images; add images or remove the folder")
        paths += files
        labels += [i] * len(files)
    return paths, labels


def _layout(root: Path) -> tuple[Path, Path | None]:
    if not root.is_dir():
        raise UserError(f"no such folder {root}; give folder:PATH with one sub-folder per class")
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        return root / "train", test
    return root, None


def sources(root: Path) -> list[Path]:
    train, test = _layout(root)
    return [p for d in (train, test) if d is not None for c in _class_folders(d) for p in sorted(c.iterdir())]


def listing(root: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """{"train": (paths, labels), "test": (paths, labels)} and the class names (the class folders' names)."""
    train_dir, test_dir = _layout(root)
    names = [p.name for p in _class_folders(train_dir)]
    paths, labels = _listing(train_dir, names)
    if test_dir is not None:
        extra = sorted({p.name for p in _class_folders(test_dir)} - set(names))
        if extra:
            raise UserError(f"{test_dir} has classes {extra} that {train_dir} lacks: the splits' classes differ")
        test_paths, _ = _listing(test_dir, [n for n in names if (test_dir / n).is_dir()])
        test_labels = [names.index(p.parent.name) for p in test_paths]
    else:
        rng = np.random.default_rng(0)
        all_paths, all_labels = paths, np.asarray(labels)
        test_mask = np.zeros(len(all_paths), dtype=bool)
        for c in range(len(names)):
            idx = np.flatnonzero(all_labels == c)
            n_test = int(round(len(idx) * TEST_FRACTION)) if len(idx) > 1 else 0
            test_mask[rng.permutation(idx)[:n_test]] = True
        paths = [p for p, t in zip(all_paths, test_mask, strict=True) if not t]
        labels = [int(c) for c, t in zip(all_labels, test_mask, strict=True) if not t]
        test_paths = [p for p, t in zip(all_paths, test_mask, strict=True) if t]
        test_labels = [int(c) for c, t in zip(all_labels, test_mask, strict=True) if t]
    return {"train": (paths, labels), "test": (test_paths, test_labels)}, names


def stored_shape(first: Path) -> tuple[int, int, int]:
    """The size a streamed folder's images are stored at: its first training image's, greyscale or RGB."""
    try:
        with Image.open(first) as im:
            return (1 if im.mode in ("L", "1", "I;16", "I") else 3), im.size[1], im.size[0]
    except OSError as e:
        raise UserError(f"cannot read image {first}: {e}; remove or replace the file")


def decode(root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    splits, names = listing(root)
    paths, labels = splits["train"]
    test_paths, test_labels = splits["test"]
    everything = paths + test_paths
    greyscale = all(_mode(p) in ("L", "1", "I;16", "I") for p in everything)
    mode = "L" if greyscale else "RGB"
    arrays = {"x_train": stack_images(paths, mode), "y_train": np.asarray(labels, dtype=np.int64)}
    if test_paths:
        arrays["x_test"] = stack_images(test_paths, mode)
    else:
        arrays["x_test"] = np.zeros((0, *arrays["x_train"].shape[1:]), dtype=np.uint8)
    arrays["y_test"] = np.asarray(test_labels, dtype=np.int64)
    return arrays, names
