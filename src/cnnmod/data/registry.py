"""Data sets by name: where their files live, how to decode them, and how to load a split.

Names: ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``cifar100-coarse``, ``tiny-imagenet``,
``digits``, ``folder:PATH`` and ``npz:PATH``. A registered name may carry a class list, ``fashion-mnist:0,3``.
The data root is ``--data-root``, else ``$CNNMOD_DATA``, else ``~/.cache/cnnmod/data``; Fashion-MNIST is also
found where Debian's ``dataset-fashion-mnist`` package puts it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import cifar, digits, folder, idx, npz, tiny_imagenet
from .cache import cache_root, cached
from .dataset import ImageSet, parse_class_list
from .transforms import Augment, resize_images

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def data_root_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("CNNMOD_DATA")
    return Path(env) if env else cache_root() / "data"


@dataclass(frozen=True)
class DatasetKind:
    """How one family of data sets is found and decoded. ``folder`` is relative to the data root."""

    folder: str
    find: Callable[[Path], list[Path]]  # the source files; raises UserError when missing
    decode: Callable[[Path], tuple[dict[str, np.ndarray], list[str]]]
    augment: Augment
    extra_roots: tuple[Path, ...] = ()


def _idx_decode(names: list[str]):
    return lambda d: (idx.decode(d), names)


KINDS: dict[str, DatasetKind] = {
    "fashion-mnist": DatasetKind("fashion-mnist", idx.sources, _idx_decode(FASHION_MNIST_CLASSES),
                                 Augment(crop_padding=2, hflip=True), (DEBIAN_FASHION_MNIST,)),
    "mnist": DatasetKind("mnist", idx.sources, _idx_decode([str(i) for i in range(10)]), Augment(crop_padding=2)),
    "cifar10": DatasetKind(".", lambda d: cifar.sources(d, False), lambda d: cifar.decode(d, False),
                           Augment(crop_padding=4, hflip=True)),
    "cifar100": DatasetKind(".", lambda d: cifar.sources(d, True), lambda d: cifar.decode(d, True),
                            Augment(crop_padding=4, hflip=True)),
    "cifar100-coarse": DatasetKind(".", lambda d: cifar.sources(d, True), lambda d: cifar.decode(d, True, True),
                                   Augment(crop_padding=4, hflip=True)),
    "tiny-imagenet": DatasetKind(".", tiny_imagenet.sources, tiny_imagenet.decode, Augment(crop_padding=8, hflip=True)),
    "digits": DatasetKind(".", lambda d: [], lambda d: digits.decode(), Augment(crop_padding=1)),
}
NAMES = sorted(KINDS) + ["folder:PATH", "npz:PATH"]


def split_spec(spec: str) -> tuple[str, list[int] | None]:
    """``"fashion-mnist:0,3"`` -> ``("fashion-mnist", [0, 3])``; ``npz:PATH:0,3`` -> ``("npz:PATH", [0, 3])``."""
    if "+" in spec:
        return spec, None
    if spec.startswith(("folder:", "npz:")):  # a path, then optionally :classes (npz:data.npz:0,3)
        match = re.fullmatch(r"((?:folder|npz):.+?):(\d+(?:,\d+)*)", spec)
        return (match.group(1), parse_class_list(match.group(2))) if match else (spec, None)
    name, _, classes = spec.partition(":")
    return name, parse_class_list(classes)


def _resolve(name: str, root: Path) -> tuple[str, Path, list[Path], Callable, Augment]:
    """(cache name, folder, source files, decoder, augmentation) of a data set name without classes."""
    if name.startswith("folder:"):
        path = Path(name[len("folder:"):]).expanduser()
        return name, path, folder.sources(path), folder.decode, Augment(crop_padding=0)
    if name.startswith("npz:"):
        path = Path(name[len("npz:"):]).expanduser()
        return name, path, npz.sources(path), npz.decode, Augment(crop_padding=0)
    kind = KINDS.get(name)
    if kind is None:
        raise UserError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")
    candidates = [root / kind.folder]
    if kind.folder != ".":
        candidates.append(root)
    candidates += list(kind.extra_roots)
    first_error = None
    for d in candidates:
        try:
            return name, d, kind.find(d), kind.decode, kind.augment
        except UserError as e:
            first_error = first_error or e
    raise UserError(f"{first_error} (looked in {', '.join(str(c) for c in candidates)})")


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images, in [0, 1] units."""
    mean, std = [], []
    for c in range(x.shape[1]):
        total = np.zeros(2)
        for start in range(0, x.shape[0], 4096):
            chunk = x[start:start + 4096, c].astype(np.float64) / 255.0
            total += (chunk.sum(), np.square(chunk).sum())
        n = x.shape[0] * x.shape[2] * x.shape[3]
        m = total[0] / max(n, 1)
        mean.append(float(m))
        std.append(float(max(np.sqrt(max(total[1] / max(n, 1) - m * m, 0.0)), 1e-3)))
    return mean, std


def _arrays(name: str, root: Path) -> tuple[dict[str, np.ndarray], dict, Path, Augment]:
    key, folder_path, sources, decode, augment = _resolve(name, root)

    def decode_with_stats():
        arrays, names = decode(folder_path)
        for split in ("train", "test"):
            y = arrays[f"y_{split}"]
            if y.size and (y.min() < 0 or y.max() >= len(names)):
                raise UserError(f"{name}: {split} labels run from {y.min()} to {y.max()} but there are "
                                f"{len(names)} classes; the files are damaged or mismatched")
        if arrays["x_train"].shape[0] == 0:
            raise UserError(f"{name} has no training images")
        mean, std = _channel_stats(arrays["x_train"])
        return arrays, {"class_names": names, "mean": mean, "std": std}

    arrays, meta = cached(key, sources, decode_with_stats)
    return arrays, meta, folder_path, augment


def load(spec: str, split: str = "train", data_root: str | os.PathLike | None = None,
         classes: list[int] | None = None) -> ImageSet:
    """One split (``train`` or ``test``) of a data set, optionally restricted to ``classes``.

    ``A+B`` joins data sets (``fashion-mnist:0,3+digits:7``): images converted to the first one's shape,
    labels one after the other, classes named ``dataset:class``, normalisation from the joined training split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if "+" in spec:
        joined = _load_union(spec, split, data_root)
        return joined.subset(classes) if classes is not None else joined
    name, spec_classes = split_spec(spec)
    if spec_classes is not None and classes is not None and spec_classes != classes:
        raise UserError(f"{spec} names classes {spec_classes} but --classes says {classes}; give them once")
    arrays, meta, folder_path, _ = _arrays(name, data_root_path(data_root))
    full = ImageSet(
        name=name, split=split,
        images=torch.from_numpy(arrays[f"x_{split}"]), labels=torch.from_numpy(arrays[f"y_{split}"]),
        class_names=list(meta["class_names"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        root=str(folder_path),
    )
    chosen = classes if classes is not None else spec_classes
    return full.subset(chosen) if chosen is not None else full


def _load_union(spec: str, split: str, data_root: str | os.PathLike | None) -> ImageSet:
    parts = [p for p in spec.split("+") if p]
    if len(parts) < 2:
        raise UserError(f"cannot read the joined data set {spec!r}: name two or more, e.g. fashion-mnist:0,3+digits:7")
    sets = [load(p, split, data_root) for p in parts]
    shape = sets[0].input_shape
    images = torch.cat([resize_images(s.images, shape) for s in sets])
    offsets = np.cumsum([0] + [s.num_classes for s in sets])
    labels = torch.cat([s.labels + int(o) for s, o in zip(sets, offsets[:-1], strict=True)])
    names = [f"{split_spec(p)[0]}:{n}" for p, s in zip(parts, sets, strict=True) for n in s.class_names]
    train_images = images if split == "train" else torch.cat(
        [resize_images(load(p, "train", data_root).images, shape) for p in parts])
    mean, std = _channel_stats(train_images.numpy())
    return ImageSet(name=spec, split=split, images=images, labels=labels, class_names=names, mean=tuple(mean),
                    std=tuple(std), root=";".join(s.root for s in sets))


def default_augment(spec: str, data_root: str | os.PathLike | None = None) -> Augment:
    if "+" in spec:
        augments = [default_augment(p, data_root) for p in spec.split("+") if p]
        return Augment(min(a.crop_padding for a in augments), all(a.hflip for a in augments))
    name, _ = split_spec(spec)
    if name in KINDS:
        return KINDS[name].augment
    return _resolve(name, data_root_path(data_root))[4]


def info(spec: str, data_root: str | os.PathLike | None = None) -> dict:
    train = load(spec, "train", data_root)
    test = load(spec, "test", data_root)
    return {"name": spec, "num_classes": train.num_classes, "class_names": train.class_names,
            "train_size": len(train), "test_size": len(test), "input_shape": list(train.input_shape),
            "root": train.root}
