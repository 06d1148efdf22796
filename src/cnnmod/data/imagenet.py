"""ImageNet-1k (``imagenet``, or ``imagenet:PATH``) in the layouts it ships in, always streamed.

    PATH/train/n01440764/*.JPEG                  one folder per class (wnid), as the training tars extract
    PATH/val/n01440764/*.JPEG                    the validation split in class folders (torchvision's layout), or
    PATH/val/ILSVRC2012_val_00000001.JPEG ...    flat, as it ships, labelled by either
        PATH/LOC_val_solution.csv                   Kaggle's "ImageId,PredictionString" (first wnid of the string)
        PATH/ILSVRC2012_devkit_t12/data/            the devkit: ILSVRC2012_validation_ground_truth.txt (one
            ILSVRC2012_validation_ground_truth.txt  ILSVRC2012_ID per image, in file-name order) and meta.mat
            meta.mat                                (ID -> wnid; read with scipy)

Classes are the training folders' wnids in sorted order (torchvision's order), named by the first synonym
from ``LOC_synset_mapping.txt`` or the devkit's ``meta.mat`` when present. Images are stored at 256 x 256
(shorter side to 256, centre crop), so a model with ``fit=center-crop`` at 224 sees ImageNet's usual
evaluation input (resize 256, centre crop 224).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError
from .images import image_files

DIR = "imagenet"
STORED = (3, 256, 256)
DEVKIT = Path("ILSVRC2012_devkit_t12") / "data"


def wnids(root: Path) -> list[str]:
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"missing {train}: give an ImageNet folder with train/<wnid>/ folders (imagenet:PATH or "
                        f"--data-root)")
    found = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{train} has no class folders (train/<wnid>/*.JPEG)")
    return found


def sources(root: Path) -> list[Path]:
    wnids(root)
    if not (root / "val").is_dir():
        raise UserError(f"missing {root / 'val'}: ImageNet's validation split is the test split")
    return [root / "train", root / "val"]


def _devkit(root: Path) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, first synonym) of the leaf classes, from the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:  # scikit-learn brings scipy; only a stripped install lacks it
        raise UserError("reading the ImageNet devkit's meta.mat needs scipy: pip install scipy")
    path = root / DEVKIT / "meta.mat"
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]).split(",")[0].strip())
                for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise UserError(f"cannot read {path} ({e}): it is not the ImageNet devkit's meta.mat")


def class_names(root: Path, ids: list[str]) -> list[str]:
    lookup = {}
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            wnid, _, words = line.partition(" ")
            lookup[wnid] = words.split(",")[0].strip()
    elif (root / DEVKIT / "meta.mat").is_file():
        lookup = dict(_devkit(root).values())
    return [lookup.get(w, w) for w in ids]


def _val(root: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    val = root / "val"
    folders = sorted(p for p in val.iterdir() if p.is_dir() and not p.name.startswith("."))
    if folders:
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise UserError(f"{val} has class folders {unknown[:3]} that {root / 'train'} lacks: the splits' "
                            "classes differ")
        paths = [p for f in folders for p in image_files(f)]
        return paths, [index[p.parent.name] for p in paths]
    files = image_files(val)
    if not files:
        raise UserError(f"{val} holds no images")
    solution = root / "LOC_val_solution.csv"
    truth = root / DEVKIT / "ILSVRC2012_validation_ground_truth.txt"
    if solution.is_file():
        label = {}
        with open(solution, newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if lineno == 1 and row[:1] == ["ImageId"]:
                    continue
                if len(row) < 2 or not row[1].split():
                    raise UserError(f"{solution}:{lineno}: expected 'ImageId,PredictionString', got {row!r}")
                label[row[0]] = row[1].split()[0]
        missing = [p.name for p in files if p.stem not in label]
        if missing:
            raise UserError(f"{solution} gives no label for {missing[0]} ({len(missing)} images unlabelled)")
        wn = [label[p.stem] for p in files]
    elif truth.is_file():
        ids = [int(t) for t in truth.read_text().split()]
        if len(ids) != len(files):
            raise UserError(f"{truth} labels {len(ids)} images but {val} holds {len(files)}")
        by_id = _devkit(root)
        try:
            wn = [by_id[i][0] for i in ids]
        except KeyError as e:
            raise UserError(f"{truth} names ILSVRC2012_ID {e}, which meta.mat lacks")
    else:
        raise UserError(f"{val} is flat but neither {solution.name} nor {truth} labels it; put them beside it or "
                        "sort the validation images into class folders")
    unknown = sorted({w for w in wn if w not in index})
    if unknown:
        raise UserError(f"the validation labels name classes {unknown[:3]} that {root / 'train'} lacks: the "
                        "splits' classes differ")
    return files, [index[w] for w in wn]


def listing(root: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """{"train": (paths, labels), "test": (paths, labels)} and the class names."""
    ids = wnids(root)
    index = {w: i for i, w in enumerate(ids)}
    train, labels = [], []
    for w in ids:
        files = image_files(root / "train" / w)
        if not files:
            raise UserError(f"class folder {root / 'train' / w} holds no images")
        train += files
        labels += [index[w]] * len(files)
    if not (root / "val").is_dir():
        raise UserError(f"missing {root / 'val'}: ImageNet's validation split is the test split")
    return {"train": (train, labels), "test": _val(root, index)}, class_names(root, ids)
