"""Artifact folders: ``config.json`` + ``model.safetensors`` + ``README.md``, written atomically, verified on load.

A write builds the whole folder under a temporary name beside the destination and renames it into place,
so an interrupted write leaves nothing half-made. Loading checks the format version, the kind and the
sha256 of the weights, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
SOURCES_DIR = "sources"  # where a composition folder keeps the source models it was made from


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless overwriting; call before long work so it fails early."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists already; choose another «out» or pass «overwrite»")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another «out»")


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on any failure it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on any failure it is removed, so
    that a write stopped midway leaves the old file or the new one, never half of one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, value) -> None:
    """``value`` as indented JSON at ``path``, atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, each in memory of its own: weights tied between layers (CoaT's shared MLPs) are
    written once per name (safetensors refuses shared memory; loading them ties them again, as the network
    shares them)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        where = v.untyped_storage().data_ptr()
        out[k] = v.clone() if where in seen and v.numel() else v
        seen.add(where)
    return out


def write_into(folder: Path, kind: str, config: dict, tensors: dict[str, torch.Tensor], card: str) -> dict:
    """Write one artifact's files into an existing (temporary) folder; returns the config as written."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(tensors), str(folder / WEIGHTS))
    full = {"format_version": FORMAT_VERSION, "kind": kind, **config, "weights_sha256": sha256_file(folder / WEIGHTS)}
    (folder / CONFIG).write_text(json.dumps(full, indent=2) + "\n")
    (folder / CARD).write_text(card)
    for name in (WEIGHTS, CONFIG, CARD):
        os.chmod(folder / name, 0o666 & ~_umask())
    return full


# the folders cnnmod writes, and the command that makes each
MADE_BY = {"model": "a model folder (cnnmod train or cnnmod import makes one)",
           "decomposition": "a decomposition folder (cnnmod decompose makes one)",
           "composition": "a composition folder (cnnmod compose makes one)",
           "module": "a module folder (the modules/ folders inside what cnnmod decompose makes)",
           "decomposition-part": "a finished part of a stopped decomposition (cnnmod decompose keeps them in "
                                 "OUT.resume)"}


def expected(kind: str | None) -> str:
    """What a folder should have been, and the command that makes it."""
    if kind in MADE_BY:
        return MADE_BY[kind]
    return ("a cnnmod folder: a model (cnnmod train or import), a decomposition (cnnmod decompose), a composition "
            "(cnnmod compose) or a module folder inside one")


def read_config(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The verified config of the artifact at ``path`` (format version and kind checked; weights not read)."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise UserError(f"{path} {state}: expected {expected(kind)}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{path} is not a cnnmod folder (it has no {CONFIG}): expected {expected(kind)}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is corrupt ({e}); restore the artifact or make it again")
    if not isinstance(config, dict) or "format_version" not in config or "kind" not in config:
        raise UserError(f"{cfg_path} is not a cnnmod config (no format_version or kind)")
    if config["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} has artifact format {config['format_version']}; this cnnmod reads format "
                        f"{FORMAT_VERSION}: upgrade cnnmod or make the artifact again")
    if kind is not None and config["kind"] != kind:
        raise UserError(f"{path} is a {config['kind']} folder: expected {expected(kind)}")
    return config


def read_artifact(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and tensors of a verified artifact: a tampered or truncated weights file is refused."""
    path = Path(path)
    config = verified_config(path, kind)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path / WEIGHTS}: {e}")
    return config, tensors


def verified_config(path: Path, kind: str | None = None) -> dict:
    """The config of the artifact at ``path``, its weights file checked against the sha256 it records (not
    read as tensors)."""
    config = read_config(path, kind)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS}: the folder is incomplete; restore it, or make it again "
                        f"(expected {expected(config['kind'])})")
    digest = sha256_file(weights)
    if digest != config.get("weights_sha256"):
        raise UserError(f"{weights} does not match the checksum in its config (sha256 {digest[:12]}..., expected "
                        f"{str(config.get('weights_sha256'))[:12]}...): the file was changed or damaged")
    return config
