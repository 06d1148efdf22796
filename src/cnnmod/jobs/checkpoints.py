"""A decomposition that survives a stop: what it has finished, kept beside the output folder while it runs.

``cnnmod decompose --out OUT`` keeps, in ``OUT.resume/``, every part of the work as it is finished (the
:class:`cnnmod.runtime.Keep` the kinds write to): the node-level observation pass each class's bits, slim modules
each step of pruning together and each finished module. Each part is an artifact folder of its own, written
atomically with its sha256 (:mod:`cnnmod.artifacts`), so a run killed at any point leaves whole parts only.
``--resume`` goes on from them with the same settings and gives the modules a run that never stopped gives, bit
for bit; under ``torchrun --max-restarts`` a restarted run goes on by itself. Once OUT is written the folder is
removed.

    OUT.resume/run.json                  the settings the parts were made with (a resumed run must match them)
    OUT.resume/observed-c00003/          kind "decomposition-part": class 3's observed bits
    OUT.resume/pruning-together/         every slim pruner after the last finished step
    OUT.resume/module-c00003/            kind "module": class 3's finished slim module
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..artifacts import atomic_folder, read_artifact, verified_config, write_into, write_json
from ..errors import UserError
from ..io.store import load_module, write_module
from ..models.resume import require_same

PART = "decomposition-part"
RUN = "run.json"


def state_folder(out: str | Path) -> Path:
    """Where the decomposition writing ``out`` keeps its finished parts."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def restarted() -> bool:
    """Whether this process is a run torchrun restarted after a worker failed (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def verify(part: Path) -> None:
    """Refuse a kept part whose weights are missing or do not match the checksum its config records."""
    try:
        verified_config(part)
    except UserError as e:
        raise UserError(f"{e}; start again with «overwrite»") from None


class DecompositionState:
    """The parts a decomposition with ``settings`` has finished, in ``folder`` (:func:`state_folder`)."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder, self.settings = folder, json.loads(json.dumps(settings))  # tuples read back as lists

    def start(self, resume: bool, overwrite: bool) -> None:
        """Begin (main process): without ``resume`` a kept folder is refused (or removed, with ``overwrite``);
        with it, one kept by a run of other settings is refused. Then the run's settings are written."""
        if self.folder.exists() and not resume:
            if not overwrite:
                raise UserError(f"{self.folder} holds {self.finished()} of a decomposition that stopped: add "
                                "«resume» to go on from it, or «overwrite» to start again")
            shutil.rmtree(self.folder)
        if (self.folder / RUN).is_file():
            require_same(self.folder, "a decomposition", json.loads((self.folder / RUN).read_text()), self.settings)
            for part in sorted(self.folder.iterdir()):  # every part whole, before any work goes on from them
                if part.is_dir() and not part.name.startswith("."):
                    verify(part)
        else:
            write_json(self.folder / RUN, self.settings)

    def finished(self) -> str:
        """What the kept parts hold, for messages."""
        names = [p.name for p in self.folder.iterdir() if not p.name.startswith(".")] if self.folder.is_dir() else []
        classes = sum(n.startswith("observed-") for n in names)
        modules = sum(n.startswith("module-") for n in names)
        return ", ".join([*([f"the observed bits of {classes} classes"] if classes else []),
                          *([f"{modules} finished modules"] if modules else []),
                          *(["a pruning step"] if "pruning-together" in names else [])]) or "nothing yet"

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------- cnnmod.runtime.Keep
    def read(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        path = self.folder / name
        if not path.is_dir():
            return None
        config, tensors = read_artifact(path, PART)
        return config["part"], tensors

    def write(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_folder(self.folder / name, overwrite=True) as tmp:
            write_into(tmp, PART, {"part": config}, tensors,
                       f"# A finished part of a decomposition: {name}\n\nKept by `cnnmod decompose` until the "
                       "decomposition is written; `--resume` goes on from it.\n")

    def module(self, concerned: int, device: torch.device | str = "cpu"):
        path = self.folder / f"module-c{concerned:05d}"
        return load_module(path, device) if path.is_dir() else None

    def keep_module(self, module) -> None:
        with atomic_folder(self.folder / f"module-c{module.concerned:05d}", overwrite=True) as tmp:
            write_module(tmp, module)
