"""Loaders for every on-disk format, on files generated in that format, and their error messages."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import idx_bytes, write_cifar10, write_cifar100, write_idx_set
from PIL import Image

from cnnmod.data import load
from cnnmod.data.idx import read_idx
from cnnmod.errors import UserError


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    written = write_idx_set(tmp_path / "mnist", gz=gz)
    train = load("mnist", "train", tmp_path)
    test = load("mnist", "test", tmp_path)
    assert train.images.shape == (60, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(written["train"][0]))
    assert train.labels.tolist() == written["train"][1].tolist()
    # statistics are those of the training images
    assert train.mean[0] == pytest.approx(written["train"][0].mean() / 255, rel=1e-6)
    assert train.std[0] == pytest.approx(written["train"][0].std() / 255, rel=1e-6)


def test_idx_cache_is_refreshed_when_the_source_changes(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", seed=0)
    first = load("mnist", "train", tmp_path).images.clone()
    written = write_idx_set(tmp_path / "mnist", seed=1)
    os.utime(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", ns=(1, 2))  # a different mtime for sure
    second = load("mnist", "train", tmp_path).images
    assert not torch.equal(first, second)
    assert torch.equal(second[:, 0], torch.from_numpy(written["train"][0]))


def test_idx_rejects_wrong_magic_truncation_and_dtype(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    cases = {"magic.idx": b"\x01" + good[1:], "short.idx": good[:-1], "code.idx": good[:2] + b"\x07" + good[3:],
             "header.idx": good[:6]}
    messages = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as e:
            read_idx(tmp_path / name)
        messages[name] = str(e.value)
    assert "magic" in messages["magic.idx"]
    assert "truncated" in messages["short.idx"]
    assert "type code" in messages["code.idx"]
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="damaged"):
        read_idx(tmp_path / "bad.gz")


def test_idx_labels_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "mnist"
    write_idx_set(d)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(60, 12, dtype=np.uint8))))
    with pytest.raises(UserError, match="labels run from 12 to 12"):
        load("mnist", "train", tmp_path)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(59, dtype=np.uint8))))
    with pytest.raises(UserError, match="59"):
        load("mnist", "train", tmp_path)


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*data fetch"):
        load("mnist", "train", tmp_path)


def test_cifar10_batches(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    train = load("cifar10", "train", tmp_path)
    test = load("cifar10", "test", tmp_path)
    assert train.images.shape == (100, 3, 32, 32) and len(test) == 20
    data, labels = written["data_batch_2"]
    # row-major 3072 = 3 planes of 32x32, batch 2 follows batch 1
    assert torch.equal(train.images[20:40], torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert train.labels[20:40].tolist() == labels
    assert train.class_names[1] == "automobile"


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    fine = load("cifar100", "train", tmp_path)
    coarse = load("cifar100-coarse", "train", tmp_path)
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.labels.tolist() == written["train"][1]
    assert coarse.labels.tolist() == written["train"][2]
    assert coarse.class_names[3] == "coarse3"


def test_cifar_batch_without_its_keys(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(UserError, match="data_batch_3 has no 'labels' entry"):
        load("cifar10", "train", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cnnmod-pwned",))


def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load posix.system|refusing to load os.system"):
        load("cifar10", "test", tmp_path)
    assert not Path("/tmp/cnnmod-pwned").exists()


def _write_tiny_imagenet(root: Path) -> None:
    d = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    rng = np.random.default_rng(0)
    for i, w in enumerate(wnids):
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for j in range(3):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(img_dir / f"{w}_{j}.JPEG", quality=95)
        # one greyscale JPEG per class, as the real set has
        Image.fromarray(np.full((64, 64), 100 + 50 * i, dtype=np.uint8), "L").save(img_dir / f"{w}_grey.JPEG")
    lines = []
    for k in range(4):
        Image.fromarray(np.full((64, 64, 3), 30 * k, dtype=np.uint8)).save(d / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[k % 2]}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    _write_tiny_imagenet(tmp_path)
    train = load("tiny-imagenet", "train", tmp_path)
    test = load("tiny-imagenet", "test", tmp_path)
    assert train.images.shape == (8, 3, 64, 64)
    assert train.class_names == ["goldfish", "European fire salamander"]
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    grey = train.images[3]  # sorted file names: *_0, *_1, *_2, *_grey
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # converted to RGB
    assert abs(int(grey[0, 10, 10]) - 100) <= 2
    assert test.labels.tolist() == [0, 1, 0, 1]


def test_folder_with_and_without_splits(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for c, value in (("cat", 10), ("dog", 200)):
            d = tmp_path / "split" / split / c
            d.mkdir(parents=True)
            for k in range(3 if split == "train" else 1):
                Image.fromarray(np.full((5, 6), value + k, dtype=np.uint8), "L").save(d / f"{k}.png")
    train = load(f"folder:{tmp_path / 'split'}", "train")
    test = load(f"folder:{tmp_path / 'split'}", "test")
    assert train.class_names == ["cat", "dog"] and train.images.shape == (6, 1, 5, 6)
    assert int(train.images[3, 0, 0, 0]) == 200 and test.labels.tolist() == [0, 1]

    flat = tmp_path / "flat"
    for c in ("a", "b"):
        (flat / c).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(np.full((4, 4, 3), k, dtype=np.uint8)).save(flat / c / f"{k}.png")
    tr, te = load(f"folder:{flat}", "train"), load(f"folder:{flat}", "test")
    assert tr.images.shape[1] == 3 and len(tr) == 8 and len(te) == 2  # 20% of each class
    assert sorted(te.labels.tolist()) == [0, 1]


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "f" / "empty").mkdir(parents=True)
    (tmp_path / "f" / "full").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "f" / "full" / "a.png")
    with pytest.raises(UserError, match="empty holds no images"):
        load(f"folder:{tmp_path / 'f'}")
    with pytest.raises(UserError, match="no such folder"):
        load(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "f" / "empty").rmdir()
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "f" / "full" / "b.png")
    with pytest.raises(UserError, match="differ in size"):
        load(f"folder:{tmp_path / 'f'}")


def test_npz_layouts_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)  # NHWC
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:2], y_test=np.array([0, 1]))
    s = load(f"npz:{tmp_path / 'a.npz'}")
    assert s.images.shape == (6, 3, 5, 5) and torch.equal(s.images[2, 1], torch.from_numpy(x[2, :, :, 1]))
    assert s.class_names == ["0", "1", "2"]
    np.savez(tmp_path / "f.npz", x_train=np.full((2, 4, 4), 0.5), y_train=np.array([0, 1]),
             x_test=np.zeros((1, 4, 4)), y_test=np.array([1]))
    assert int(load(f"npz:{tmp_path / 'f.npz'}").images[0, 0, 0, 0]) == 128
    np.savez(tmp_path / "b.npz", x_train=x, y_train=np.zeros(6))
    with pytest.raises(UserError, match="lacks x_test, y_test"):
        load(f"npz:{tmp_path / 'b.npz'}")
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load(f"npz:{tmp_path / 'c.npz'}")
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, -1]), x_test=x[:1], y_test=np.array([0]),
             class_names=np.array(["a", "b", "c"]))
    with pytest.raises(UserError, match="labels run from -1"):
        load(f"npz:{tmp_path / 'd.npz'}")


def test_digits_split_is_fixed_and_complete() -> None:
    train, test = load("digits", "train"), load("digits", "test")
    assert len(train) + len(test) == 1797 and train.input_shape == (1, 8, 8)
    assert int(train.images.max()) == 255
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35  # 20% of each class (about 180 each)
    again = load("digits", "test")
    assert torch.equal(test.images, again.images)


def test_unknown_data_set_and_class_list(tmp_path: Path, npz_data: str) -> None:
    with pytest.raises(UserError, match="unknown data set 'cifar11'.*known:"):
        load("cifar11")
    with pytest.raises(UserError, match="has no class 7"):
        load(npz_data, classes=[0, 7])
    with pytest.raises(UserError, match="cannot read the class list"):
        load("digits:a,b")
    sub = load("digits:7,3")
    assert sub.class_names == ["7", "3"] and sub.source_classes == [7, 3]
    assert set(sub.labels.tolist()) == {0, 1}
    full = load("digits")
    assert torch.equal(sub.images[sub.labels == 0], full.images[full.labels == 7])
