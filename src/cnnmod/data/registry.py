"""Data sets by name: where their files live, how to decode them, and how to load a split.

Names: ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``cifar100-coarse``, ``tiny-imagenet``,
``digits``, ``imagenet`` (or ``imagenet:PATH``), ``folder:PATH`` and ``npz:PATH``. ImageNet and large
folders are streamed from disk (:mod:`cnnmod.data.stream`); the others are decoded once into memory. A
registered name may carry a class list, ``fashion-mnist:0,3``.
The data root is ``--data-root``, else ``$CNNMOD_DATA``, else ``~/.cache/cnnmod/data``; Fashion-MNIST is also
found where Debian's ``dataset-fashion-mnist`` package puts it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import write_json
from ..errors import UserError
from ..progress import say
from . import cifar, digits, folder, idx, imagenet, npz, tiny_imagenet
from . import stream as streaming
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
NAMES = sorted(KINDS) + ["imagenet", "imagenet:PATH", "folder:PATH", "npz:PATH"]
PATH_PREFIXES = ("folder:", "npz:", "imagenet:")


def split_spec(spec: str) -> tuple[str, list[int] | None]:
    """``"fashion-mnist:0,3"`` -> ``("fashion-mnist", [0, 3])``; ``npz:PATH:0,3`` -> ``("npz:PATH", [0, 3])``."""
    if "+" in spec:
        return spec, None
    if spec.startswith(PATH_PREFIXES) and not re.fullmatch(r"imagenet:\d+(?:,\d+)*", spec):
        # a path, then optionally :classes (npz:data.npz:0,3)
        match = re.fullmatch(r"((?:folder|npz|imagenet):.+?):(\d+(?:,\d+)*)", spec)
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
    raise UserError(f"{first_error.message} (looked in {', '.join(str(c) for c in candidates)})")


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images, in [0, 1] units."""
    return streaming.channel_stats(x[start:start + 4096] for start in range(0, max(x.shape[0], 1), 4096))


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


def _streamed(name: str, root: Path, stream: bool | None):
    """(folder, listing function, stored shape) when ``name`` is read from disk batch by batch, else None."""
    if name == "imagenet" or name.startswith("imagenet:"):
        path = Path(name[len("imagenet:"):]).expanduser() if ":" in name else root / imagenet.DIR
        return path, imagenet.listing, imagenet.STORED
    if name.startswith("folder:") and stream is not False:
        path = Path(name[len("folder:"):]).expanduser()
        splits, names = folder.listing(path)
        if stream or len(splits["train"][0]) > streaming.STREAM_ABOVE:
            return path, lambda _p: (splits, names), folder.stored_shape(splits["train"][0][0])
    return None


def _stream_split(name: str, split: str, path: Path, listing, shape: tuple[int, int, int]) -> ImageSet:
    splits, names = listing(path)
    images = {s: streaming.FileImages(path, streaming.relative(path, p), *shape) for s, (p, _) in splits.items()}
    labels = torch.as_tensor(splits[split][1], dtype=torch.int64)
    mean, std = _stream_stats(images["train"])
    chosen = images[split]
    if streaming.skip_bad_images():
        keep, bad = chosen.readable()
        if bad:
            say(f"skipped {len(bad)} unreadable image{'s' * (len(bad) > 1)} of {name} ({split}); the first: "
                f"{bad[0]}")
            chosen, labels = chosen.select(keep), labels[keep]
    return ImageSet(name=name, split=split, images=chosen, labels=labels, class_names=list(names),
                    mean=tuple(mean), std=tuple(std), root=str(path))


def _stream_stats(train: streaming.FileImages) -> tuple[list[float], list[float]]:
    """A streamed set's normalisation, from a seeded sample of its training split, cached by its listing."""
    path = cache_root() / "streams" / f"{train.digest()[:24]}.json"
    if path.is_file():
        try:
            stats = json.loads(path.read_text())
            return stats["mean"], stats["std"]
        except (json.JSONDecodeError, KeyError):
            pass
    mean, std = streaming.listing_stats(train)
    try:
        write_json(path, {"mean": mean, "std": std, "images": len(train)})
    except OSError:  # a read-only cache only costs the sample again next time
        pass
    return mean, std


def load(spec: str, split: str = "train", data_root: str | os.PathLike | None = None,
         classes: list[int] | None = None, stream: bool | None = None) -> ImageSet:
    """One split (``train`` or ``test``) of a data set, optionally restricted to ``classes``.

    ``A+B`` joins data sets (``fashion-mnist:0,3+digits:7``): images converted to the first one's shape,
    labels one after the other, classes named ``dataset:class``, normalisation from the joined training split.
    ``stream`` forces a ``folder:`` set to be streamed (True) or decoded into memory (False); by default it
    is streamed above :data:`cnnmod.data.stream.STREAM_ABOVE` images. ImageNet is always streamed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if "+" in spec:
        joined = _load_union(spec, split, data_root)
        return joined.subset(classes) if classes is not None else joined
    name, spec_classes = split_spec(spec)
    if spec_classes is not None and classes is not None and spec_classes != classes:
        raise UserError(f"{spec} names classes {spec_classes} but «classes» says {classes}; give them once")
    chosen = classes if classes is not None else spec_classes
    streamed = _streamed(name, data_root_path(data_root), stream)
    if streamed is not None:
        full = _stream_split(name, split, *streamed)
        return full.subset(chosen) if chosen is not None else full
    arrays, meta, folder_path, _ = _arrays(name, data_root_path(data_root))
    full = ImageSet(
        name=name, split=split,
        images=torch.from_numpy(arrays[f"x_{split}"]), labels=torch.from_numpy(arrays[f"y_{split}"]),
        class_names=list(meta["class_names"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        root=str(folder_path),
    )
    return full.subset(chosen) if chosen is not None else full


def _load_union(spec: str, split: str, data_root: str | os.PathLike | None) -> ImageSet:
    parts = [p for p in spec.split("+") if p]
    if len(parts) < 2:
        raise UserError(f"cannot read the joined data set {spec!r}: name two or more, e.g. fashion-mnist:0,3+digits:7")
    sets = [load(p, split, data_root) for p in parts]
    if any(streaming.is_streamed(s.images) for s in sets):
        raise UserError(f"cannot join {spec}: joining reads the sets into memory, and a streamed set (ImageNet, a "
                        "large folder) does not fit; compose modules of separate data sets instead")
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
    if name == "imagenet" or name.startswith("imagenet:"):
        return Augment(crop_padding=0, hflip=True)
    return _resolve(name, data_root_path(data_root))[4]


def info(spec: str, data_root: str | os.PathLike | None = None) -> dict:
    train = load(spec, "train", data_root)
    test = load(spec, "test", data_root)
    return {"name": spec, "num_classes": train.num_classes, "class_names": train.class_names,
            "train_size": len(train), "test_size": len(test), "input_shape": list(train.input_shape),
            "root": train.root}
