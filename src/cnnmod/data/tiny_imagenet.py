"""Tiny ImageNet (``tiny-imagenet-200/``): train folders per wnid, labelled validation set as the test split.

Greyscale JPEGs are converted to RGB. Class names come from ``words.txt`` (first synonym) when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .images import image_files, stack_images

DIR = "tiny-imagenet-200"


def _wnids(d: Path) -> list[str]:
    path = d / "wnids.txt"
    if path.is_file():
        wnids = [w.strip() for w in path.read_text().split() if w.strip()]
    elif (d / "train").is_dir():
        wnids = sorted(p.name for p in (d / "train").iterdir() if p.is_dir())
    else:
        raise UserError(f"missing {d / 'train'}; run `cnnmod data fetch tiny-imagenet` or point «data_root» at it")
    if not wnids:
        raise UserError(f"{d} lists no classes")
    return wnids


def sources(root: Path) -> list[Path]:
    d = root / DIR
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"missing {ann}; run `cnnmod data fetch tiny-imagenet` or point «data_root» at the folder")
    return [d / "train", ann] + [p for p in (d / "wnids.txt", d / "words.txt") if p.exists()]


def decode(root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    d = root / DIR
    wnids = _wnids(d)
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        folder = d / "train" / w / "images"
        if not folder.is_dir():
            folder = d / "train" / w
        files = image_files(folder)
        if not files:
            raise UserError(f"class folder {folder} holds no images; fetch the data set again")
        train_paths += files
        train_labels += [index[w]] * len(files)
    test_paths, test_labels = [], []
    ann = d / "val" / "val_annotations.txt"
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise UserError(f"{ann}:{lineno}: expected 'file<TAB>wnid' with a known wnid, got {line[:60]!r}")
        path = d / "val" / "images" / parts[0]
        if not path.is_file():
            raise UserError(f"{ann}:{lineno} names {path}, which does not exist")
        test_paths.append(path)
        test_labels.append(index[parts[1]])
    names = list(wnids)
    words = d / "words.txt"
    if words.is_file():
        lookup = {}
        for line in words.read_text().splitlines():
            if "\t" in line:
                w, text = line.split("\t", 1)
                lookup[w] = text.split(",")[0].strip()
        names = [lookup.get(w, w) for w in wnids]
    arrays = {
        "x_train": stack_images(train_paths, "RGB"), "y_train": np.asarray(train_labels, dtype=np.int64),
        "x_test": stack_images(test_paths, "RGB"), "y_test": np.asarray(test_labels, dtype=np.int64),
    }
    return arrays, names
