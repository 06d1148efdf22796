"""Resumable training: the state of the last finished epoch, kept beside the output folder while a model trains.

``cnnmod train --out OUT`` writes, after every epoch, ``OUT.resume/``: an artifact folder (:mod:`cnnmod.artifacts`:
written atomically, tensors in safetensors with their sha256, a card) of kind ``training-state`` holding everything
the loop needs to go on as if it had never stopped: the weights, the optimizer's and the schedule's state, the best
checkpoint so far, the history, and every random generator the loop draws from (the global one, and each process's
augmentation generator). ``--resume`` goes on from it with the same settings; once OUT is written it is removed.
A resumed run gives the same weights, bit for bit, as one that never stopped, on the same device and world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import atomic_folder, read_artifact, read_config, write_into
from ..errors import UserError

KIND = "training-state"
# settings that may differ between the run that stopped and the one that goes on: where the data lies
FREE = ("data_root",)


def resume_folder(out: str | Path) -> Path:
    """Where the training run writing ``out`` keeps its last finished epoch."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def split_tensors(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """``value`` (nested dicts, lists, tuples, tensors, numbers, strings) as JSON: each tensor moved into
    ``tensors`` under a key beginning with ``prefix`` and replaced by ``{"tensor": key}``; a dict as a list of
    [key, value] pairs (so that integer keys, as an optimizer's state has, stay integers), a tuple marked as one."""
    if isinstance(value, torch.Tensor):
        key = prefix if prefix not in tensors else f"{prefix}#{len(tensors)}"  # a key with dots may meet a path
        tensors[key] = value.detach().cpu().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in a training state")


def join_tensors(value, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "tuple" in value:
            return tuple(join_tensors(v, tensors) for v in value["tuple"])
        return {k: join_tensors(v, tensors) for k, v in value["dict"]}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def _card(settings: dict, epoch: int) -> str:
    return (f"# Training state: {settings['arch']} on {settings['data']}, epoch {epoch} of {settings['epochs']}\n\n"
            "What `cnnmod train` keeps of a run that has not finished: the last finished epoch's weights, optimizer, "
            "schedule, best checkpoint so far, history and random generators. Go on with the same command and "
            "`--resume`; start again with `--overwrite`. It is removed once the model folder is written.\n")


def write_state(folder: Path, state: dict, settings: dict) -> None:
    """The loop's ``state`` after an epoch (:func:`cnnmod.models.train.fit`), with the run's ``settings``, into
    ``folder`` atomically: a run stopped while writing keeps the previous epoch's."""
    tensors: dict[str, torch.Tensor] = {}
    config = {"settings": settings, "epoch": state["epoch"], "state": split_tensors(state, "state", tensors)}
    with atomic_folder(folder, overwrite=True) as tmp:
        write_into(tmp, KIND, config, tensors, _card(settings, state["epoch"]))


def stopped_at(folder: Path) -> str:
    """How far the run kept in ``folder`` got, for messages: "epoch E of N"."""
    config = read_config(folder, KIND)
    return f"epoch {config.get('epoch')} of {config.get('settings', {}).get('epochs')}"


def read_state(folder: Path, settings: dict) -> dict:
    """The state kept in ``folder``, verified (checksum, kind) and refused unless it was written by a run with
    the same ``settings`` (a resumed run must be the run that stopped; only :data:`FREE` may differ)."""
    config, tensors = read_artifact(folder, KIND)
    require_same(folder, "a run", config.get("settings", {}), settings, FREE)
    return join_tensors(config["state"], tensors)


def require_same(folder: Path, what: str, kept: dict, settings: dict, free: tuple[str, ...] = ()) -> None:
    """Refuse to go on from ``what`` kept in ``folder`` with settings ``kept`` unless they are ``settings`` (all
    but ``free``), naming the ones that differ."""
    settings = json.loads(json.dumps(settings))  # tuples read back as lists
    differ = sorted(k for k in set(kept) | set(settings) if k not in free and kept.get(k) != settings.get(k))
    if differ:
        said = ", ".join(f"{k} {kept.get(k)!r} (now {settings.get(k)!r})" for k in differ)
        raise UserError(f"{folder} holds {what} with other settings: {said}; give the same settings to go on from "
                        "it, or «overwrite» to start again")
