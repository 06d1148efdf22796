"""Streamed image sets: the files of a split listed up front, decoded batch by batch in DataLoader workers.

An :class:`~cnnmod.data.dataset.ImageSet` whose ``images`` is a :class:`FileImages` never holds its split
in memory: selecting classes or inputs only narrows the listing, and the images of a batch are decoded when
the batch is asked for (:func:`batched`). Every file is brought to one stored size (``height`` x ``width``)
as it is decoded: its shorter side resized to cover that size (bilinear, antialiased), then the centre cut
out; an image already of that size is kept as it is. The model's own input fit (``InputSpec``) applies after.

A file that cannot be decoded stops the run with one line naming it; :func:`skipping_bad_images` (the
command line's ``--skip-bad-images``) instead drops the unreadable files of a split when it is loaded (one
decoding pass over the split) and says how many it dropped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

# folder:PATH splits with more images than this are streamed instead of decoded into memory
STREAM_ABOVE = int(os.environ.get("CNNMOD_STREAM_ABOVE", "50000"))
_SKIP_BAD = {"on": os.environ.get("CNNMOD_SKIP_BAD_IMAGES", "") not in ("", "0")}


@contextmanager
def skipping_bad_images(on: bool = True) -> Iterator[None]:
    """Within the block, streamed splits loaded leave their unreadable images out (and say how many)."""
    before = _SKIP_BAD["on"]
    _SKIP_BAD["on"] = on
    try:
        yield
    finally:
        _SKIP_BAD["on"] = before


def skip_bad_images() -> bool:
    return _SKIP_BAD["on"]


def workers() -> int:
    """DataLoader worker processes for decoding: ``$CNNMOD_WORKERS``, else one per CPU core (at most 8)."""
    env = os.environ.get("CNNMOD_WORKERS")
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise UserError(f"CNNMOD_WORKERS must be a whole number, got {env!r}")
    return min(8, os.cpu_count() or 1)


def decode_file(path: str | os.PathLike, mode: str, height: int, width: int) -> np.ndarray:
    """The image at ``path`` in Pillow ``mode`` brought to ``height`` x ``width`` (see the module's note), as
    uint8 (C, H, W). Raises OSError or ValueError when the file cannot be decoded."""
    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        if (h, w) != (height, width):
            scale = max(height / h, width / w)
            size = (max(width, round(w * scale)), max(height, round(h * scale)))
            im = im.resize(size, Image.BILINEAR, reducing_gap=None)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            im = im.crop((left, top, left + width, top + height))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class _Files(torch.utils.data.Dataset):
    """What a worker decodes: item i is (i, image, error); an unreadable file gives zeros and its error."""

    def __init__(self, images: FileImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        f = self.images
        try:
            arr = decode_file(f.path(i), f.mode, f.height, f.width)
            return i, torch.from_numpy(np.ascontiguousarray(arr)), ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return i, torch.zeros(f.channels, f.height, f.width, dtype=torch.uint8), str(e) or type(e).__name__


def _collate(items):
    index = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    return index, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]


class FileImages:
    """A listing of image files that behaves as a uint8 (N, C, H, W) tensor where cnnmod reads images:
    ``shape``, ``dtype``, ``dim()``, ``len()``, indexing (decodes the images asked for) and :meth:`select`
    (a narrower listing, nothing decoded)."""

    dtype = torch.uint8

    def __init__(self, root: str | os.PathLike, files: np.ndarray | Sequence[str], channels: int, height: int,
                 width: int) -> None:
        self.root = str(root)
        self.files = files if isinstance(files, np.ndarray) else np.asarray([str(f).encode() for f in files],
                                                                             dtype=np.bytes_)
        if channels not in (1, 3):
            raise ValueError(f"streamed images have 1 or 3 channels, not {channels}")
        self.channels, self.height, self.width = int(channels), int(height), int(width)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, self.height, self.width))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i].decode())

    def digest(self) -> str:
        """sha256 of the listing and the stored size: equal on two processes iff they read the same images."""
        h = hashlib.sha256(f"{self.root}|{self.channels}x{self.height}x{self.width}|".encode())
        h.update(b"\0".join(self.files.tolist()))
        return h.hexdigest()

    def select(self, index: torch.Tensor | np.ndarray | slice) -> FileImages:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return FileImages(self.root, self.files[index], self.channels, self.height, self.width)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.select(slice(index, index + 1))[:][0]
        chosen = self if isinstance(index, slice) and index == slice(None) else self.select(index)
        out = list(batched(chosen, [torch.arange(len(chosen))]))
        return out[0] if out else torch.zeros(0, self.channels, self.height, self.width, dtype=torch.uint8)

    def readable(self, show_progress: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Decode every file once: (bool keep mask, the unreadable files' paths)."""
        from ..progress import progress_bar

        keep = torch.ones(len(self), dtype=torch.bool)
        bad = []
        chunks = list(torch.arange(len(self)).split(256))
        with progress_bar("checking images", len(self), show_progress) as step:
            for index, _, errors in _loader(self, chunks):
                for i, e in zip(index.tolist(), errors, strict=True):
                    if e:
                        keep[i] = False
                        bad.append(self.path(i))
                step(len(errors))
        return keep, bad


def _loader(images: FileImages, chunks: Sequence[torch.Tensor]):
    total = sum(int(c.numel()) for c in chunks)
    n = workers() if total > 64 else 0
    return torch.utils.data.DataLoader(_Files(images), batch_sampler=[c.tolist() for c in chunks],
                                       num_workers=min(n, len(chunks)), collate_fn=_collate)


def batched(images: torch.Tensor | FileImages, chunks: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The uint8 images at each index tensor of ``chunks``, in order: sliced from a tensor, or decoded in
    DataLoader workers from a :class:`FileImages` (one pool for all the chunks)."""
    if isinstance(images, torch.Tensor):
        for c in chunks:
            yield images[c]
        return
    chunks = [c for c in chunks if c.numel()]
    if not chunks:
        return
    for index, x, errors in _loader(images, chunks):
        for i, e in zip(index.tolist(), errors, strict=True):
            if e:
                raise UserError(f"cannot read image {images.path(i)}: {e}; remove or replace the file, or pass "
                                "--skip-bad-images to leave unreadable images out")
        yield x


def batches(images: torch.Tensor | FileImages, batch_size: int) -> Iterator[torch.Tensor]:
    """All of ``images`` in batches of ``batch_size``."""
    yield from batched(images, list(torch.arange(images.shape[0]).split(max(1, batch_size))))


def select(images: torch.Tensor | FileImages, index: torch.Tensor) -> torch.Tensor | FileImages:
    """``images[index]`` without decoding anything when the images are streamed."""
    return images.select(index) if isinstance(images, FileImages) else images[index]


def is_streamed(images) -> bool:
    return isinstance(images, FileImages)


def listing_stats(images: FileImages, samples: int = 1000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] units over a seeded sample of ``samples`` images (a
    streamed training split is not read whole for its normalisation)."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return channel_stats(x.numpy() for x in batched(images, list(pick.split(256))))


def channel_stats(batches: Iterable[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation, in [0, 1] units, of uint8 (N, C, H, W) batches (float64 sums;
    a standard deviation is at least 1e-3)."""
    total, count = None, 0
    for x in batches:
        if total is None:
            total = np.zeros((x.shape[1], 2))
        for c in range(x.shape[1]):
            chunk = x[:, c].astype(np.float64) / 255.0
            total[c] += (chunk.sum(), np.square(chunk).sum())
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean, std = [], []
    for s, s2 in total if total is not None else []:
        m = s / max(count, 1)
        mean.append(float(m))
        std.append(float(max(np.sqrt(max(s2 / max(count, 1) - m * m, 0.0)), 1e-3)))
    return mean, std


def relative(root: Path, paths: Sequence[Path]) -> np.ndarray:
    """Paths relative to ``root``, as the compact byte strings a :class:`FileImages` keeps."""
    base = str(root).rstrip("/") + "/"
    return np.asarray([str(p)[len(base):].encode() if str(p).startswith(base) else str(p).encode() for p in paths],
                      dtype=np.bytes_)
