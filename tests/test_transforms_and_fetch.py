"""Tensor transforms against direct computations, and fetching from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_cifar10, write_idx_set

from cnnmod.cli import main
from cnnmod.data import load
from cnnmod.data.fetch import FetchSpec, RemoteFile, fetch
from cnnmod.data.transforms import Augment, InputSpec, convert_channels, random_crop, random_hflip, to_input
from cnnmod.errors import UserError


def test_random_crop_is_a_window_of_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_hflip_flips_about_half_and_nothing_else() -> None:
    x = torch.rand(400, 1, 3, 4)
    out = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_to_input_normalises_resizes_and_converts_channels() -> None:
    images = torch.full((2, 1, 8, 8), 51, dtype=torch.uint8)  # 0.2
    spec = InputSpec(3, 16, 16, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    x = to_input(images, spec)
    assert x.shape == (2, 3, 16, 16)
    expected = torch.tensor([(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected.expand_as(x), atol=1e-5)
    rgb = torch.tensor([[[[255]], [[0]], [[0]]]], dtype=torch.uint8)
    assert convert_channels(rgb, 1).item() == pytest.approx(0.299 * 255)


def test_augment_keeps_shape_and_is_seeded() -> None:
    """Every augmented image is one of its input's 6x6 windows once zero-padded by 1, flipped or not (all 18 tried),
    the same for the same seed; across 8 images some move."""
    x = torch.randint(1, 255, (8, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = Augment(crop_padding=1, hflip=True)
    out = a(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, a(x, torch.Generator().manual_seed(3)))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert any(not torch.equal(out[i], x[i]) for i in range(len(x)))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _cifar_archive(tmp_path: Path, served: Path) -> str:
    write_cifar10(tmp_path / "src", per_batch=4)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (served / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


def test_fetch_downloads_verifies_and_unpacks(tmp_path: Path, http_root) -> None:
    served, url = http_root
    md5 = _cifar_archive(tmp_path, served)
    spec = FetchSpec("cifar-10-batches-py", (RemoteFile(f"{url}/cifar-10-python.tar.gz", md5),), "tar")
    root = tmp_path / "data"
    folder = fetch("cifar10", root, spec=spec, show_progress=False)
    assert folder == root / "cifar-10-batches-py"
    assert len(load("cifar10", "train", root)) == 20
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temporary left
    with pytest.raises(UserError, match="exists already"):
        fetch("cifar10", root, spec=spec, show_progress=False)


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path: Path, http_root, capsys) -> None:
    served, url = http_root
    _cifar_archive(tmp_path, served)
    root = tmp_path / "data"
    # the official checksum cannot match a generated archive: the fetch must refuse it
    rc = main(["data", "fetch", "cifar10", "--data-root", str(root), "--mirror", url])
    err = capsys.readouterr().err
    assert rc == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    assert not root.exists() or list(root.iterdir()) == []
    rc = main(["data", "fetch", "cifar10", "--data-root", str(root), "--mirror", url + "/missing"])
    assert rc == 2 and "cannot download" in capsys.readouterr().err


def test_fetch_refuses_unsafe_archive_paths(tmp_path: Path, http_root) -> None:
    served, url = http_root
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    (served / "evil.tar.gz").write_bytes(buf.getvalue())
    spec = FetchSpec("x", (RemoteFile(f"{url}/evil.tar.gz", hashlib.md5(buf.getvalue()).hexdigest()),), "tar")
    with pytest.raises(UserError, match="unsafe path"):
        fetch("x", tmp_path / "data", spec=spec, show_progress=False)
    assert not (tmp_path / "escape.txt").exists()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_keeps_unpacked_files_as_they_come(tmp_path: Path, http_root) -> None:
    """Fashion-MNIST's four gzipped IDX files are kept as downloaded, checksums verified, and load as the set."""
    served, url = http_root
    arrays = write_idx_set(served)
    names = [f"{stem}-{kind}-idx{n}-ubyte.gz" for stem in ("train", "t10k")
             for kind, n in (("images", 3), ("labels", 1))]
    spec = FetchSpec("fashion-mnist", tuple(RemoteFile(f"{url}/{n}", _md5(served / n)) for n in names), "none")
    root = tmp_path / "data"
    assert fetch("fashion-mnist", root, spec=spec, show_progress=False) == root / "fashion-mnist"
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(names)
    train = load("fashion-mnist", "train", root)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert train.labels.tolist() == arrays["train"][1].tolist()


def test_fetch_unpacks_a_zip_archive(tmp_path: Path, http_root) -> None:
    """Tiny ImageNet comes as one zip holding its folder: downloaded, verified, unpacked, and it loads."""
    import zipfile

    from test_data_formats import _write_tiny_imagenet

    served, url = http_root
    _write_tiny_imagenet(tmp_path / "src")
    with zipfile.ZipFile(served / "tiny-imagenet-200.zip", "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "src"))
    spec = FetchSpec("tiny-imagenet-200", (RemoteFile(f"{url}/tiny-imagenet-200.zip",
                                                      _md5(served / "tiny-imagenet-200.zip")),), "zip")
    root = tmp_path / "data"
    assert fetch("tiny-imagenet", root, spec=spec, show_progress=False) == root / "tiny-imagenet-200"
    assert sorted(p.name for p in root.iterdir()) == ["tiny-imagenet-200"]  # no archive or temporary left
    assert load("tiny-imagenet", "train", root).images.shape == (8, 3, 64, 64)
