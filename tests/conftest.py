"""Fixtures: data sets generated in their true on-disk formats, and an isolated cache for every test session."""

from __future__ import annotations

import gzip
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest

_SESSION_TMP = tempfile.mkdtemp(prefix="cnnmod-tests-")
os.environ["CNNMOD_CACHE"] = str(Path(_SESSION_TMP) / "cache")
os.environ["CNNMOD_DATA"] = str(Path(_SESSION_TMP) / "data")
os.environ["CNNMOD_NO_PROGRESS"] = "1"
os.environ["CNNMOD_ENERGY"] = "estimator"  # fast and deterministic; one test measures with codecarbon


def idx_bytes(arr: np.ndarray) -> bytes:
    """An array in the IDX format (uint8 only: type code 0x08)."""
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx_set(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """An MNIST-layout folder of random 28x28 images with labels 0..9; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in ((f"{stem}-images-idx3-ubyte", x), (f"{stem}-labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            if gz:
                (folder / f"{kind}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / kind).write_bytes(data)
        arrays[split] = (x, y)
    return arrays


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict:
    """``cifar-10-batches-py/`` as the official python pickles (bytes keys, protocol 2)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return written


def write_cifar100(root: Path, n: int = 30, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("train", "test"):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [v // 5 for v in fine]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f, protocol=2)
        written[name] = (data, fine, coarse)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f, protocol=2)
    return written


def synthetic_arrays(n_per_class: int = 40, classes: int = 3, size: int = 8, seed: int = 0):
    """A learnable image set: class c lights up band c of the image (plus noise)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    band = size // classes
    for c in range(classes):
        x = rng.integers(0, 60, (n_per_class, size, size)).astype(np.uint8)
        x[:, c * band:(c + 1) * band, :] += 180
        xs.append(x)
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(y))
    return x[order], y[order].astype(np.int64)


def write_npz(path: Path, n_per_class: int = 40, classes: int = 3, size: int = 8, seed: int = 0) -> Path:
    x_train, y_train = synthetic_arrays(n_per_class, classes, size, seed)
    x_test, y_test = synthetic_arrays(max(n_per_class // 4, 2), classes, size, seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array([f"band{c}" for c in range(classes)]))
    return path


@pytest.fixture
def npz_data(tmp_path: Path) -> str:
    """``npz:PATH`` of a small learnable 3-class, 8x8 greyscale data set."""
    return f"npz:{write_npz(tmp_path / 'bands.npz')}"
