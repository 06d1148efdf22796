"""Decompositions and modules on disk.

A decomposition folder holds its source model once and one folder per module:

    DIR/config.json                  kind "decomposition": settings, seconds, the modules and their classes
    DIR/README.md
    DIR/model/                       the source model artifact (config.json, model.safetensors, README.md)
    DIR/modules/c03-dress/           kind "module": concerned class, settings, metrics, the source's sha256
        config.json  model.safetensors (bit-packed masks, zlib-compressed where that pays, + the two-way
        head)  README.md

A module names its source by a path relative to its own folder (``../../model``) and the source's weights
sha256; a module folder copied together with its source loads anywhere, and one whose source does not match
the recorded checksum is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import CARD, CONFIG, SOURCES_DIR, atomic_folder, read_artifact, read_config
from ..composition.base import COMPOSER_KINDS, Composer, composer_kind_of
from ..composition.build import build, composing_for
from ..composition.voting import check_composable
from ..errors import UserError
from ..models.classifier import Classifier
from ..models.folder import SourceCache, load_model, save_into
from ..models.reference import allows_code, how_to_trust
from ..modules.base import BinaryModule
from ..modules.kinds import kind_named, kind_of

MODEL_DIR = "model"
MODULES_DIR = "modules"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "class"


def module_folder_name(m: BinaryModule) -> str:
    return f"c{m.concerned:02d}-{slug(m.class_name)}"


def write_module(folder: Path, m: BinaryModule, source_rel: str | None = None, source_sha: str | None = None) -> dict:
    """A module folder, as its kind writes it (:data:`~cnnmod.modules.kinds.MODULE_KINDS`): a node-level module
    points at its source model; a slim module holds its own network."""
    return kind_of(m).write(folder, m, source_rel, source_sha)


def decomposition_card(config: dict) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in config["settings"].items())
    lines = [f"# Decomposition of {config['source']['arch']} on {config['source']['dataset']}", "",
             f"{len(config['modules'])} modules ({settings}); made in {config['seconds']:.2f} s.", "",
             "| class | name | kept | folder |", "|---|---|---|---|"]
    for m in config["modules"]:
        lines.append(f"| {m['class']} | {m['name']} | {100 * m['kept_fraction']:.2f}% | {m['path']} |")
    lines += ["", "Kept: nodes for node-level modules, parameters for slim (channel-level) ones.",
              "Evaluate with `cnnmod evaluate DIR`; load with `cnnmod.load_modules(DIR)`.", ""]
    trust = how_to_trust(config["source"]["arch"])
    return "\n".join(lines + ([f"Note: {trust}.", ""] if trust else []))


def save_decomposition(modules: Sequence[BinaryModule], out: str | os.PathLike, overwrite: bool = False,
                       extra: dict | None = None, source: Classifier | None = None) -> dict:
    """Write the source model once and every module; returns the decomposition's config. Slim modules need
    their ``source`` given, or to come from :func:`cnnmod.decompose`, which remembers it (it is written beside
    them, for comparison; they load without it)."""
    if not modules:
        raise UserError("nothing to save: no modules")
    source = source or getattr(modules, "model", None) or modules[0].source_model  # cnnmod.decompose's
    if source is None:
        raise UserError("slim modules run without their source model: give it to save_decomposition (source=...)")
    if any(m.source_model not in (None, source) for m in modules):
        raise UserError("a decomposition folder holds modules of one source model; save the others separately")
    with atomic_folder(out, overwrite) as tmp:
        model_config = save_into(source, tmp / MODEL_DIR)
        sha = model_config["weights_sha256"]
        entries = []
        for m in modules:
            name = module_folder_name(m)
            write_module(tmp / MODULES_DIR / name, m, f"../../{MODEL_DIR}", sha)
            entries.append({"class": m.concerned, "name": m.class_name, "path": f"{MODULES_DIR}/{name}",
                            "kept_fraction": round(m.kept_fraction(), 6)})
        settings = {k: v for k, v in modules[0].settings.items()
                    if k not in ("observed", "decomposition_seconds", "calibration_seconds", "seconds")}
        seconds = modules[0].settings.get("decomposition_seconds")
        if seconds is None:  # slim modules are made one by one
            seconds = sum(m.settings.get("seconds", 0.0) for m in modules)
        config = {"format_version": 1, "kind": "decomposition", "settings": settings, "seconds": seconds,
                  "source": {"path": MODEL_DIR, "weights_sha256": sha, "arch": source.arch,
                             "dataset": source.dataset, "num_classes": source.num_classes},
                  "modules": entries, **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(decomposition_card(config))
    return config


def composition_card(config: dict) -> str:
    lines = [f"# Composition of {len(config['classes'])} modules", "",
             "A cnnmod composition: a classifier made of per-class modules, no training. "
             f"Continuous learning: {'on' if config.get('continuous_learning') else 'off'}.", "",
             "| position | class | kept nodes | source model |", "|---|---|---|---|"]
    for e in config["classes"]:
        lines.append(f"| {e['position']} | {e['name']} | {100 * e['kept_fraction']:.2f}% | {e['source']} |")
    lines += ["", "Evaluate with `cnnmod evaluate DIR`; load with `cnnmod.load_modules(DIR)`.", ""]
    return "\n".join(lines)


def save_composition(modules: Sequence[BinaryModule], out: str | os.PathLike, overwrite: bool = False,
                     extra: dict | None = None) -> dict:
    """Write a composition: each source model once under ``sources/``, each module under ``modules/``."""
    check_composable(modules)
    with atomic_folder(out, overwrite) as tmp:
        written: dict[int, tuple[str, str]] = {}
        for m in modules:
            source = m.source_model
            if source is None or id(source) in written:  # slim modules carry their own network
                continue
            staging = tmp / SOURCES_DIR / f".staging-{len(written)}"
            sha = save_into(source, staging)["weights_sha256"]
            name = f"{slug(source.arch)}-{slug(m.ref.dataset)}-{sha[:12]}"
            if (tmp / SOURCES_DIR / name).exists():  # the same weights under another Python object
                shutil.rmtree(staging)
            else:
                staging.rename(tmp / SOURCES_DIR / name)
            written[id(source)] = (name, sha)
        entries = []
        for i, m in enumerate(modules):
            folder = f"{i:02d}-{slug(m.ref.dataset)}-{slug(m.class_name)}"
            source, sha = written[id(m.source_model)] if m.source_model is not None else ("(slim: its own network)",
                                                                                           "")
            write_module(tmp / MODULES_DIR / folder, m, f"../../{SOURCES_DIR}/{source}", sha)
            entries.append({"position": i, "name": m.ref.qualified, "dataset": m.ref.dataset,
                            "class": m.source_class, "path": f"{MODULES_DIR}/{folder}",
                            "kept_fraction": round(m.kept_fraction(), 6), "source": source})
        config = {"format_version": 1, "kind": "composition", "classes": entries,
                  "sources": sorted({name for name, _ in written.values()}), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(composition_card(config))
    return config


@allows_code
def load_module(path: str | os.PathLike, device: torch.device | str = "cpu",
                sources: SourceCache | None = None) -> BinaryModule:
    """A module folder, verified (its own checksum, its source's checksum and the masks' shapes), loaded as its
    kind reads it (:data:`MODULE_KINDS`)."""
    path = Path(path)
    config, tensors = read_artifact(path, "module")
    kind = kind_named(config.get("granularity", "node"), path)
    return kind.load(path, config, tensors, device, sources or SourceCache())


def module_paths(path: str | os.PathLike) -> list[Path]:
    """The module folders a path stands for: a decomposition folder (all its modules; ``DIR:0,3,7`` only those
    classes', so that the other modules are never read) or one module folder."""
    text = str(path)
    picked = None if Path(text).exists() else re.fullmatch(r"(.+):(\d+(?:,\d+)*)", text)
    path = Path(picked.group(1) if picked else text)
    config = read_config(path)
    if picked:
        if config["kind"] != "decomposition":
            raise UserError(f"{text}: classes can be picked from a decomposition folder; {path} is a {config['kind']}")
        by_class = {int(m["class"]): path / m["path"] for m in config["modules"]}
        wanted = [int(c) for c in picked.group(2).split(",")]
        missing = [c for c in wanted if c not in by_class]
        if missing:
            raise UserError(f"{path} has no module for class {missing[0]} (it has {len(by_class)} modules, classes "
                            f"{min(by_class)}..{max(by_class)})")
        return [by_class[c] for c in wanted]
    if config["kind"] == "decomposition":
        return [path / m["path"] for m in config["modules"]]
    if config["kind"] == "composition":
        if composer_kind_of(config) is not None:  # a network of its own
            raise UserError(f"{path} is a merged slim composition: one network, not separate modules; evaluate or "
                            "export it as it is")
        return [path / m["path"] for m in config["classes"]]
    if config["kind"] == "module":
        return [path]
    if config["kind"] == "model":
        raise UserError(f"{path} is a model folder; this takes modules: a decomposition, composition or module "
                        f"folder (make them with cnnmod decompose {path} --out DIR)")
    raise UserError(f"{path} is a {config['kind']} folder, not a decomposition, a composition or a module folder")


@allows_code
def load_modules(paths: str | os.PathLike | Sequence[str | os.PathLike], device: torch.device | str = "cpu"
                 ) -> list[BinaryModule]:
    """Modules from decomposition folders and module folders, sharing each source model."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources = SourceCache()
    return [load_module(p, device, sources) for path in paths for p in module_paths(path)]


def composition_setting(paths: Sequence[str | os.PathLike], key: str, default: str) -> str:
    """A setting the composition folders among ``paths`` were made with (``calibration``, ``mode``); ``default``
    for other folders, or where they disagree."""
    values = set()
    for p in paths:
        config = read_config(p)
        values.add(config.get(key, default) if config["kind"] == "composition" else default)
    return values.pop() if len(values) == 1 else default


def load_source_of(path: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier | None:
    """The source model of a decomposition folder (None for anything else)."""
    path = Path(path)
    config = read_config(path)
    if config["kind"] != "decomposition":
        return None
    return load_model(path / config["source"]["path"], device)


def save_network(name: str, composer: Composer, sources: Sequence[Classifier], out: str | os.PathLike,
                 overwrite: bool = False, extra: dict | None = None) -> dict:
    """A composition that is a network of its own (built by the :class:`~cnnmod.modules.kinds.Composing` called
    ``name``), as its composition kind writes it (:data:`~cnnmod.composition.base.COMPOSER_KINDS`), with its
    source models beside it."""
    return COMPOSER_KINDS[name].save(composer, list(sources), out, overwrite, extra)


@allows_code
def load_composer(paths: str | os.PathLike | Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                  calibration: str | None = None, mode: str | None = None) -> tuple[Composer, list[Classifier]]:
    """Whatever ``paths`` hold as one classifier, and the source models it is measured against: a composition
    folder that is a network of its own as its network(s); module, decomposition or composition folders as their
    modules, composed with ``calibration`` and ``mode`` (default: as the composition folders among them were
    made)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    whole = composer_kind_of(read_config(paths[0])) if len(paths) == 1 else None
    if whole is not None:
        return whole.load(paths[0], device)
    modules = load_modules(paths, device)
    mode = mode or composition_setting(paths, "mode", "vote")
    composing = composing_for(modules, mode)
    if composing is not None and composing.network:
        raise UserError(f"«mode» {mode} makes these modules one network of its own: cnnmod compose "
                        f"{' '.join(map(str, paths))} --mode {mode} --out DIR makes it; evaluate DIR")
    composer = build(modules, mode, calibration or composition_setting(paths, "calibration", "none"))
    return composer, composer.sources


def source_dirs(path: str | os.PathLike) -> set[Path]:
    """The folders of the source models of the modules ``path`` stands for (:func:`module_paths`: a
    decomposition folder, ``DIR:0,6``, or module folders inside a decomposition folder), which a composition
    that is a network of its own is fitted from."""
    found = set()
    for p in module_paths(path):
        candidate = p.parent.parent / MODEL_DIR
        if not (candidate / CONFIG).is_file():
            raise UserError(f"cannot find the source model of {p} (expected at {candidate}): merging slim modules "
                            "needs the decomposition folder they were saved in (cnnmod decompose writes the model "
                            "there)")
        found.add(candidate.resolve())
    return found


def source_models(paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu") -> dict[str, Classifier]:
    """The source models of the modules ``paths`` stand for, each loaded once, by their weights' sha256."""
    folders = sorted({d for p in paths for d in source_dirs(p)})
    models = (load_model(f, device) for f in folders)
    return {m.info["weights_sha256"]: m for m in models}
