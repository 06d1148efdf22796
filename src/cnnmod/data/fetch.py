"""Download a data set from its official address, verify checksums, and unpack atomically.

Everything is first written under a temporary folder beside the destination; only a verified, fully
unpacked result is renamed into place, so an interrupted or failed fetch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import UserError
from ..progress import progress_bar


@dataclass(frozen=True)
class RemoteFile:
    url: str
    md5: str


@dataclass(frozen=True)
class FetchSpec:
    """Files to download; ``unpack`` is ``none`` (keep them), ``tar`` or ``zip``; the result is ``target``."""

    target: str  # folder under the data root that the fetch creates
    files: tuple[RemoteFile, ...]
    unpack: str = "none"


_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"

SPECS: dict[str, FetchSpec] = {
    "fashion-mnist": FetchSpec("fashion-mnist", (
        RemoteFile(_FMNIST + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        RemoteFile(_FMNIST + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        RemoteFile(_FMNIST + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        RemoteFile(_FMNIST + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    )),
    "mnist": FetchSpec("mnist", (
        RemoteFile(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        RemoteFile(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    )),
    "cifar10": FetchSpec("cifar-10-batches-py", (
        RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    ), "tar"),
    "cifar100": FetchSpec("cifar-100-python", (
        RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    ), "tar"),
    "tiny-imagenet": FetchSpec("tiny-imagenet-200", (
        RemoteFile("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"),
    ), "zip"),
}
SPECS["cifar100-coarse"] = SPECS["cifar100"]


def md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, show_progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(f"download {dest.name}", total=total, enabled=show_progress) as advance:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    advance(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot download {url}: {getattr(e, 'reason', e)}; check the network or use «mirror»")


def _safe_members(names: list[str], archive: Path) -> None:
    for n in names:
        p = PurePosixPath(n)
        if p.is_absolute() or ".." in p.parts:
            raise UserError(f"{archive} holds an unsafe path {n!r}; refusing to unpack it")


def _unpack(archive: Path, into: Path, kind: str) -> None:
    try:
        if kind == "tar":
            with tarfile.open(archive) as tf:
                _safe_members(tf.getnames(), archive)
                tf.extractall(into, filter="data")
        elif kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                _safe_members(zf.namelist(), archive)
                zf.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot unpack {archive}: {e}; fetch it again")


def fetch(name: str, root: Path, spec: FetchSpec | None = None, mirror: str | None = None,
          overwrite: bool = False, show_progress: bool = True) -> Path:
    """Fetch data set ``name`` into ``root``; returns the folder created. ``mirror`` replaces the URLs' base."""
    spec = spec or SPECS.get(name)
    if spec is None:
        fetchable = ", ".join(sorted(SPECS))
        raise UserError(f"cannot fetch {name!r}: only {fetchable} have an official download "
                        "(digits ships with scikit-learn)")
    final = root / spec.target
    if final.exists() and not overwrite:
        raise UserError(f"{final} exists already; use «overwrite» to fetch again")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        downloads, staged = work / "downloads", work / "staged"
        downloads.mkdir()
        staged.mkdir()
        for remote in spec.files:
            url = remote.url if not mirror else mirror.rstrip("/") + "/" + remote.url.rsplit("/", 1)[1]
            dest = downloads / url.rsplit("/", 1)[1]
            _download(url, dest, show_progress)
            got = md5_of(dest)
            if got != remote.md5:
                raise UserError(f"checksum mismatch for {url}: md5 {got}, expected {remote.md5}; "
                                "the download is damaged or not the official file")
        if spec.unpack == "none":
            result = staged / spec.target
            shutil.move(str(downloads), result)
        else:
            for archive in downloads.iterdir():
                _unpack(archive, staged, spec.unpack)
            result = staged / spec.target
            if not result.is_dir():
                raise UserError(f"the archive did not contain {spec.target}/; it is not the expected data set")
        if final.exists():
            shutil.rmtree(final)
        result.rename(final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)
