"""Fixtures: data sets generated in their true on-disk formats, and an isolated cache for every test session."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.cli import main
from cnnmod.data.dataset import ImageSet
from cnnmod.data.transforms import InputSpec
from cnnmod.models import build
from cnnmod.models.classifier import Classifier

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


# ---------------------------------------------------------------- helpers shared by the test files
def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_user_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnmod: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def train_small_cnn(out: Path, data: str, capsys, epochs: int) -> dict:
    """``cnnmod train`` of the small CNN (Adam, lr 0.01, batch 16) into ``out``; its JSON result."""
    rc, stdout, err = run(["train", "--arch", "cnn", "--data", data, "--epochs", str(epochs), "--batch-size", "16",
                           "--optimizer", "adam", "--lr", "0.01", "--out", str(out), "--json"], capsys)
    assert rc == 0, err
    return json.loads(stdout)


def stop_after_epoch(run, after: int, monkeypatch) -> Path:
    """``run()``, training stopped (as by Ctrl-C) once a run keeps its epoch ``after`` in an ``OUT.resume``
    folder: that folder, checked to be there with no ``OUT`` beside it."""
    from cnnmod.jobs import train as train_job

    real, kept = train_job.write_state, []

    def stop(folder, state, settings):
        real(folder, state, settings)
        if state["epoch"] == after:
            kept.append(folder)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "write_state", stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_job, "write_state", real)
    folder = kept[0]
    assert folder.is_dir() and not folder.with_name(folder.name[:-len(".resume")]).exists()
    return folder


def stopped_training(s, out: Path, after: int, monkeypatch) -> None:
    """``cnnmod.jobs.train.train`` with settings ``s`` into ``out``, stopped (as by Ctrl-C) once epoch ``after`` is
    kept in ``out.resume``."""
    from cnnmod.jobs.train import train

    kept = stop_after_epoch(lambda: train(s, out, show_progress=False), after, monkeypatch)
    assert kept == out.parent / f"{out.name}.resume"


def as_trained(net, data: ImageSet) -> Classifier:
    """A plain network taken as trained on ``data``'s own normalisation, stated (cnnmod never assumes it)."""
    if isinstance(net, Classifier):
        return net
    from cnnmod.models.classifier import wrap

    return wrap(net, data=data, mean=data.mean, std=data.std)


def random_data(shape=(1, 12, 12), classes=4, per_class=9, seed=0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageSet("rand", "train", images, labels, [f"r{c}" for c in range(classes)], (0.5,), (0.25,))


def source(arch: str, **kwargs) -> Classifier:
    torch.manual_seed(0)
    net = build(arch, (1, 12, 12), 4, **kwargs).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so re-estimating them matters
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "x", {}, "rand")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slim_with_reference(clf: Classifier, data: ImageSet, concerned: int, s) -> tuple:
    """A slim module made as ``slim_module`` makes it, and the gated network it was cut from, as the pruner holds
    it after its last step: (module, (net, graph, groups, gates, head_weight, head_bias))."""
    from cnnmod.slim import ModuleMaker
    from cnnmod.slim.config import MODULE_SIZE

    s = s.resolved(MODULE_SIZE)
    s.check()
    maker = ModuleMaker(clf, data, concerned, s)
    module = maker.module(maker.prune())
    p = maker.pruner
    return module, (p.net, p.graph, p.groups, [g.clone() for g in p.gates], *p.head())


class ToTensorDigits(torch.utils.data.Dataset):
    """scikit-learn's digits as a user's Dataset gives them: uint8 images through ``ToTensor()``, [0, 1] floats
    (``normalize``: a ``Normalize((mean,), (std,))`` after it)."""

    classes = [str(c) for c in range(10)]

    def __init__(self, x: torch.Tensor, y: torch.Tensor, normalize: tuple[float, float] | None = None) -> None:
        self.x, self.y, self.normalize = x, y, normalize

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        image = self.x[i]
        if self.normalize:
            image = (image - self.normalize[0]) / self.normalize[1]
        return image, int(self.y[i])


def user_network(n_train: int = 1400) -> dict:
    """A CNN trained in a user's own loop on digits as [0, 1] inputs (no Normalize): ``net``, its ``train_ds`` and
    ``test_ds`` (the last 397 images), and ``own``, its test top-1 in that loop."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8)).unsqueeze(1).float() / 255
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = order[:n_train], order[1400:]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(4):
        for b in torch.randperm(len(tr), generator=torch.Generator().manual_seed(1)).split(32):
            loss = torch.nn.functional.cross_entropy(net(x[tr[b]]), y[tr[b]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        own = 100 * (net(x[te]).argmax(1) == y[te]).float().mean().item()
    return {"train_ds": ToTensorDigits(x[tr], y[tr]), "test_ds": ToTensorDigits(x[te], y[te]), "net": net,
            "own": own}
