"""Decode a data set once into .npy files and memory-map them on every later load.

The cache key is the data set name plus the size and modification time of every source file, so a changed
or replaced source is decoded again. Writes go to a temporary folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_VERSION = 1


def cache_root() -> Path:
    env = os.environ.get("CNNMOD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnmod"


def source_key(name: str, sources: list[Path]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}:{name}".encode())
    for p in sorted(sources):
        st = p.stat()
        h.update(f"|{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


Decoded = dict[str, np.ndarray]


def cached(name: str, sources: list[Path], decode: Callable[[], tuple[Decoded, dict]]) -> tuple[Decoded, dict]:
    """Arrays and metadata for ``name``: memory-mapped from the cache, or decoded, stored, then mapped."""
    folder = cache_root() / "decoded" / f"{name.replace(':', '_').replace('/', '_')}-{source_key(name, sources)}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        arrays, meta = decode()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            for key, arr in arrays.items():
                np.save(tmp / f"{key}.npy", np.ascontiguousarray(arr))
            (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": sorted(arrays)}))
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished first: its copy is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = json.loads(meta_path.read_text())
    arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="c") for key in meta["arrays"]}
    return arrays, meta
