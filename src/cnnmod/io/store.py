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
import math
import os
import re
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts import CARD, CONFIG, atomic_folder, read_artifact, read_config, write_into
from ..composition.base import Composer
from ..composition.voting import check_composable, compose
from ..core.bits import pack_bits, unpack_bits
from ..core.channels import slice_network
from ..core.graph import ModelGraph
from ..data.transforms import InputSpec
from ..errors import UserError
from ..models import build
from ..models.classifier import Classifier
from ..models.folder import load_model, load_weights, save_into
from ..models.reference import allows_code
from ..modules.base import BinaryModule
from ..node.module import Module
from ..slim.merged import FusedSlim, MergedSlim
from ..slim.module import SlimModule

MODEL_DIR = "model"
MODULES_DIR = "modules"
SOURCES_DIR = "sources"
PARTS_DIR = "parts"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return pack_bits(mask.reshape(-1))


def mask_tensors(name: str, packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed mask as stored: ``maskz.NAME`` (its bytes zlib-compressed) where that saves a tenth or more
    (kept masks are mostly ones), else ``mask.NAME`` as it is."""
    raw = packed.detach().cpu().contiguous().numpy().tobytes()
    squeezed = zlib.compress(raw, 6)
    if len(squeezed) <= 0.9 * len(raw):
        return {f"maskz.{name}": torch.frombuffer(bytearray(squeezed), dtype=torch.uint8)}
    return {f"mask.{name}": packed.detach().cpu()}


def stored_mask(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The packed mask of point ``name`` from a module's tensors, compressed or not."""
    if f"maskz.{name}" in tensors:
        try:
            raw = zlib.decompress(tensors[f"maskz.{name}"].numpy().tobytes())
        except zlib.error as e:
            raise UserError(f"the compressed mask of {name} cannot be read ({e}); the module is damaged")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return tensors[f"mask.{name}"]


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = math.prod(shape)
    if 8 * packed.numel() < n:
        raise UserError(f"a packed mask holds {8 * packed.numel()} bits but its point has {n} nodes; the module is "
                        "damaged")
    return unpack_bits(packed.reshape(-1), n).reshape(tuple(shape))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "class"


def module_folder_name(m: BinaryModule) -> str:
    return f"c{m.concerned:02d}-{slug(m.class_name)}"


def module_card(m: Module) -> str:
    on = m.source.dataset or "custom data"
    lines = [f"# Module: {m.class_name} (class {m.concerned}) of {m.source.arch} on {on}",
             "", "A cnnmod module: a binary classifier, \"my class\" vs \"not my class\", made from the source "
             "model without retraining (Pan & Rajan, ICSE 2022).", "",
             f"- variant: {m.settings.get('variant')}",
             f"- kept nodes: {m.kept_nodes()} of {m.total_nodes()} ({100 * m.kept_fraction():.2f}%)"]
    for key, value in m.metrics.items():
        if key != "kept_fraction":
            lines.append(f"- {key}: {value}")
    lines += ["", "Load it with `cnnmod.load_module(path)`; it needs its source model at the recorded path.", ""]
    return "\n".join(lines)


def module_config(m: Module, source_rel: str, source_sha: str) -> dict:
    return {"concerned_class": m.concerned, "class_name": m.class_name, "source_class": m.source_class,
            "dataset": m.source.dataset, "input": m.source.spec.to_dict(),
            "source": {"path": source_rel, "weights_sha256": source_sha, "arch": m.source.arch,
                       "num_classes": m.source.num_classes},
            "points": [{"name": p.name, "shape": list(p.shape)} for p in m.points],
            "classifier": m.classifier_name, "settings": m.settings, "metrics": m.metrics,
            "calibration": m.calibration,
            "kept_nodes": m.kept_nodes(), "total_nodes": m.total_nodes()}


def module_tensors(m: Module) -> dict[str, torch.Tensor]:
    tensors = {k: v for name, packed in m.packed_masks.items() for k, v in mask_tensors(name, packed).items()}
    tensors["head.weight"] = m.head_weight
    tensors["head.bias"] = m.head_bias
    return {**tensors, **typical_tensors(m)}


def typical_tensors(m) -> dict[str, torch.Tensor]:
    """A module's in-distribution test as ``typical.*`` tensors (none when it has no test)."""
    return {f"typical.{k}": v for k, v in (m.typical or {}).items()}


def typical_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    return {k[len("typical."):]: v for k, v in tensors.items() if k.startswith("typical.")} or None


def write_module(folder: Path, m: BinaryModule, source_rel: str | None = None, source_sha: str | None = None) -> dict:
    """A module folder, as its kind writes it (:data:`MODULE_KINDS`): a node-level module points at its source
    model; a slim module holds its own network."""
    return MODULE_KINDS[m.granularity].write(folder, m, source_rel, source_sha)


def _write_node(folder: Path, m: Module, source_rel: str | None, source_sha: str | None) -> dict:
    return write_into(folder, "module", module_config(m, source_rel, source_sha), module_tensors(m), module_card(m))


def _write_slim(folder: Path, m: SlimModule, source_rel: str | None, source_sha: str | None) -> dict:
    return write_into(folder, "module", slim_config(m), {**m.net.state_dict(), **typical_tensors(m)}, slim_card(m))


def slim_config(m) -> dict:
    return {"granularity": "channel", "concerned_class": m.concerned, "class_name": m.class_name,
            "source_class": m.source_class, "dataset": m.dataset, "input": m.spec.to_dict(),
            "source": m.source_info, "classifier": m.classifier_name, "removed": m.removed,
            "settings": m.settings, "metrics": m.metrics, "calibration": m.calibration}


def slim_card(m) -> str:
    return "\n".join([f"# Slim module: {m.class_name} (class {m.concerned}) of {m.source_info['arch']} on "
                      f"{m.dataset or 'custom data'}", "",
                      "A cnnmod slim module: a physically smaller network (channels cut from the source model, "
                      "no retraining) that says \"my class\" or \"not my class\". It loads without its source.", "",
                      f"- parameters: {m.params()} ({100 * m.kept_fraction():.1f}% of the source model's)",
                      f"- kept channels: {m.metrics.get('kept_channels')} of {m.metrics.get('channels')}",
                      f"- importance rule: {m.settings.get('rule')}",
                      *([f"- made with the recipe {m.settings['recipe']!r} (cnnmod decompose --slim-recipe)"]
                        if m.settings.get("recipe") else []),
                      *_learned_lines(m.settings), ""])


def _learned_lines(settings: dict) -> list[str]:
    """What a slim module learned after its last pruning step (nothing: no line)."""
    lines = []
    if settings.get("reconstruct"):
        lines.append("- refitted after pruning: the kept weights of every convolution and linear layer, by least "
                     "squares, so that each layer's outputs match the source model's on observed inputs (no loss, "
                     "no labels)")
    epochs = settings.get("scale_epochs", 0)
    if epochs:
        bn = ", and every BatchNorm layer's scale and shift" if settings.get("scale_bn") else ""
        lines.append(f"- learned after pruning, {epochs} epochs, convolutions frozen: a scale per kept channel "
                     f"(folded into the weights){bn}")
    if settings.get("joint_heads"):
        lines.append(f"- head refitted together with the other classes' modules (weight {settings['joint_heads']:g} "
                     "on their composition's cross-entropy)")
    return lines


def _input_shape(config: dict) -> tuple[int, int, int]:
    return tuple(config["input"][k] for k in ("channels", "height", "width"))


def build_sliced(config: dict) -> nn.Module:
    """The network of a saved slim module: its source architecture, sliced as recorded (weights to be loaded)."""
    info, shape = config["source"], _input_shape(config)
    net = build(info["arch"], shape, len(info["class_names"]), **info["arch_args"]).eval()
    return slice_network(net, shape, config["removed"], ModelGraph(net, shape).head, None, None)


def build_merged(config: dict) -> nn.Module:
    """The network of a saved merged slim composition (weights to be loaded)."""
    info, shape = config["source"], _input_shape(config)
    net = build(info["arch"], shape, len(info["class_names"]), **info["arch_args"]).eval()
    return slice_network(net, shape, config["removed"], ModelGraph(net, shape).head, None, None,
                         outputs=len(config["concerned"]))


def _load_slim(path: Path, config: dict, tensors: dict[str, torch.Tensor], device: torch.device | str,
               sources: SourceCache) -> SlimModule:
    net = build_sliced(config)
    load_weights(net, {k: v for k, v in tensors.items() if not k.startswith("typical.")},
                 f"slim {config['source']['arch']}", path)
    m = SlimModule(net, config["classifier"], InputSpec.from_dict(config["input"]), config["class_name"],
                   config["concerned_class"], config["source"], config["removed"], config.get("settings", {}),
                   config.get("metrics"), config.get("calibration"), typical_of(tensors))
    return m.to(device).eval()


def decomposition_card(config: dict) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in config["settings"].items())
    lines = [f"# Decomposition of {config['source']['arch']} on {config['source']['dataset']}", "",
             f"{len(config['modules'])} modules ({settings}); made in {config['seconds']:.2f} s.", "",
             "| class | name | kept | folder |", "|---|---|---|---|"]
    for m in config["modules"]:
        lines.append(f"| {m['class']} | {m['name']} | {100 * m['kept_fraction']:.2f}% | {m['path']} |")
    lines += ["", "Kept: nodes for node-level modules, parameters for slim (channel-level) ones.",
              "Evaluate with `cnnmod evaluate DIR`; load with `cnnmod.load_modules(DIR)`.", ""]
    return "\n".join(lines)


def save_decomposition(modules: Sequence[BinaryModule], out: str | os.PathLike, overwrite: bool = False,
                       extra: dict | None = None, source: Classifier | None = None) -> dict:
    """Write the source model once and every module; returns the decomposition's config. Slim modules need
    their ``source`` given (it is written beside them, for comparison; they load without it)."""
    if not modules:
        raise UserError("nothing to save: no modules")
    source = source or modules[0].source_model
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


class SourceCache:
    """Loads each source model once, so modules of one model share it (and compose in one batched pass)."""

    def __init__(self) -> None:
        self.models: dict[Path, tuple[Classifier, ModelGraph]] = {}

    def get(self, path: Path, sha: str, device: torch.device | str) -> tuple[Classifier, ModelGraph]:
        path = path.resolve()
        if path not in self.models:
            if not (path / CONFIG).is_file():
                raise UserError(f"the module's source model is not at {path}; copy the source model folder with "
                                "the module (keep their relative places)")
            config = read_config(path, "model")
            if config.get("weights_sha256") != sha:
                raise UserError(f"the source model at {path} is not the one the module was made from (its weights "
                                "sha256 differs); give the module its own source model")
            clf = load_model(path, device)
            self.models[path] = (clf, ModelGraph(clf.net, clf.spec.shape))
        return self.models[path]


@allows_code
def load_module(path: str | os.PathLike, device: torch.device | str = "cpu",
                sources: SourceCache | None = None) -> BinaryModule:
    """A module folder, verified (its own checksum, its source's checksum and the masks' shapes), loaded as its
    kind reads it (:data:`MODULE_KINDS`)."""
    path = Path(path)
    config, tensors = read_artifact(path, "module")
    kind = config.get("granularity", "node")
    if kind not in MODULE_KINDS:
        raise UserError(f"{path} is a module of kind {kind!r}, which this cnnmod does not know: upgrade cnnmod")
    return MODULE_KINDS[kind].load(path, config, tensors, device, sources or SourceCache())


def _load_node(path: Path, config: dict, tensors: dict[str, torch.Tensor], device: torch.device | str,
               sources: SourceCache) -> Module:
    source_cfg = config["source"]
    clf, graph = sources.get(path / source_cfg["path"], source_cfg["weights_sha256"], device)
    recorded = [(p["name"], tuple(p["shape"])) for p in config["points"]]
    actual = [(p.name, p.shape) for p in graph.points]
    if recorded != actual:
        raise UserError(f"{path} was made for other observation points than its source model has; make the "
                        "module again from this model")
    try:
        masks = {name: unpack_mask(stored_mask(tensors, name), shape) for name, shape in recorded}
        head_w, head_b = tensors["head.weight"], tensors["head.bias"]
    except KeyError as e:
        raise UserError(f"{path}/model.safetensors lacks {e}; the module is damaged")
    typical = typical_of(tensors)
    m = Module(clf, graph, config["concerned_class"], masks, head_w, head_b, config.get("settings"),
               config.get("metrics"), config.get("calibration"), typical)
    return m.to(device)


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
        if config.get("granularity") == "channel":
            raise UserError(f"{path} is a merged slim composition: one network, not separate modules; evaluate or "
                            "export it as it is")
        return [path / m["path"] for m in config["classes"]]
    if config["kind"] == "module":
        return [path]
    raise UserError(f"{path} is a {config['kind']}, not a decomposition, a composition or a module")


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


def save_merged_slim(merged, source: Classifier, out: str | os.PathLike, overwrite: bool = False,
                     extra: dict | None = None) -> dict:
    """A merged slim composition: one network (``model.safetensors``) and its source model under ``sources/``
    (for comparisons; the network loads without it)."""
    with atomic_folder(out, overwrite) as tmp:
        return _write_merged(tmp, merged, source, extra)


def _write_merged(folder: Path, merged, source: Classifier, extra: dict | None = None) -> dict:
    sha = save_into(source, folder / SOURCES_DIR / "source")["weights_sha256"]
    classes = [{"position": i, "name": n, "class": c, "concerned": k}
               for i, (n, c, k) in enumerate(zip(merged.qualified_names, merged.classes, merged.concerned,
                                                 strict=True))]
    config = {"granularity": "channel", "mode": "merged", "classes": classes, "concerned": merged.concerned,
              "input": merged.spec.to_dict(), "source": merged.source_info, "source_path": f"{SOURCES_DIR}/source",
              "source_sha256": sha, "classifier": merged.classifier_name, "removed": merged.removed,
              "settings": merged.settings, "metrics": merged.metrics, **(extra or {})}
    card = "\n".join([f"# Merged slim composition of {len(classes)} classes", "",
                      "Slim modules of one model merged into one network (the union of their kept channels), "
                      "one pass for all classes; no retraining of the backbone.", "",
                      f"- classes: {', '.join(merged.qualified_names)}",
                      f"- parameters: {merged.params()} ({100 * merged.metrics['params_fraction']:.1f}% of the "
                      "source model's)", *_learned_lines(merged.settings), ""])
    return write_into(folder, "composition", config, merged.net.state_dict(), card)


def save_fused_slim(fused, sources: Sequence[Classifier], out: str | os.PathLike, overwrite: bool = False,
                    extra: dict | None = None) -> dict:
    """A fused slim composition: one merged slim composition per source model under ``parts/p0``, ``parts/p1``,
    ... (each with its source model), and a config naming the classes in order."""
    with atomic_folder(out, overwrite) as tmp:
        parts = []
        for i, (part, source) in enumerate(zip(fused.parts, sources, strict=True)):
            _write_merged(tmp / PARTS_DIR / f"p{i}", part, source)
            parts.append(f"{PARTS_DIR}/p{i}")
        classes = [{"position": i, "name": n} for i, n in enumerate(fused.qualified_names)]
        config = {"granularity": "channel", "mode": "fused", "classes": classes, "parts": parts,
                  "input_shape": list(fused.input_shape), **(extra or {})}
        card = "\n".join([f"# Fused slim composition of {len(classes)} classes", "",
                          f"One merged slim network per source model ({len(parts)}), run side by side; each scores "
                          "its own classes against all the others. No retraining of any backbone.", "",
                          f"- classes: {', '.join(fused.qualified_names)}",
                          f"- parameters: {fused.params()}", ""])
        return write_into(tmp, "composition", config, {}, card)


@allows_code
def load_fused_slim(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The fused slim composition at ``path`` and its parts' source models."""
    path = Path(path)
    config, _ = read_artifact(path, "composition")
    loaded = [load_merged_slim(path / part, device) for part in config["parts"]]
    return FusedSlim([m for m, _ in loaded]).to(device).eval(), [s for _, s in loaded]


@allows_code
def load_merged_slim(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The merged slim composition at ``path`` and its source model."""
    path = Path(path)
    config, tensors = read_artifact(path, "composition")
    net = build_merged(config)
    load_weights(net, tensors, f"merged {config['source']['arch']}", path)
    merged = MergedSlim(net, config["classifier"], InputSpec.from_dict(config["input"]), config["concerned"],
                        config["source"], config["removed"], config.get("settings", {}), config.get("metrics"))
    return merged.to(device).eval(), load_model(path / config["source_path"], device)


def _save_merged_from_list(merged: MergedSlim, sources: list[Classifier], out: str | os.PathLike,
                           overwrite: bool = False, extra: dict | None = None) -> dict:
    return save_merged_slim(merged, sources[0], out, overwrite, extra)


def _load_merged_as_list(path: str | os.PathLike, device: torch.device | str = "cpu"):
    merged, source = load_merged_slim(path, device)
    return merged, [source]


# The compositions that are networks of their own (slim), by mode: how each is written and read. Compositions of
# module folders (voting, and merged node-level modules) load as their modules, composed as recorded.
SLIM_COMPOSITIONS = {"merged": (_save_merged_from_list, _load_merged_as_list),
                     "fused": (save_fused_slim, load_fused_slim)}


def save_slim_composition(composer: Composer, sources: Sequence[Classifier], out: str | os.PathLike,
                          overwrite: bool = False, extra: dict | None = None) -> dict:
    """A slim composition (merged or fused), as its mode writes it, with its source models beside it."""
    return SLIM_COMPOSITIONS[composer.mode][0](composer, list(sources), out, overwrite, extra)


@allows_code
def load_composer(paths: str | os.PathLike | Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                  calibration: str | None = None, mode: str | None = None) -> tuple[Composer, list[Classifier]]:
    """Whatever ``paths`` hold as one classifier, and the source models it is measured against: a slim
    composition folder as its network(s); module, decomposition or composition folders as their modules,
    composed with ``calibration`` and ``mode`` (default: as the composition folders among them were made)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    whole = slim_composition(paths)
    if whole is not None:
        return SLIM_COMPOSITIONS[whole][1](paths[0], device)
    modules = load_modules(paths, device)
    composer = compose(modules, calibration=calibration or composition_setting(paths, "calibration", "none"),
                       mode=mode or composition_setting(paths, "mode", "vote"))
    return composer, composer.sources


def slim_composition(paths: Sequence[str | os.PathLike]) -> str | None:
    """``"merged"`` or ``"fused"`` when ``paths`` is one slim composition folder (one network, or one per model),
    else None (module folders, which load as modules)."""
    if len(paths) != 1:
        return None
    config = read_config(paths[0])
    if config["kind"] != "composition" or config.get("granularity") != "channel":
        return None
    return config.get("mode", "merged")


def slim_source_dir(path: str | os.PathLike) -> Path:
    """The folder of the source model of slim modules given as a decomposition folder or a module folder in one."""
    p = Path(path)
    config = read_config(p)
    candidate = p / MODEL_DIR if config["kind"] == "decomposition" else p.parent.parent / MODEL_DIR
    if not (candidate / CONFIG).is_file():
        raise UserError(f"cannot find the source model of {p}: merging slim modules needs their decomposition "
                        "folder (it holds the model)")
    return candidate.resolve()


def slim_source_of(paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu") -> Classifier:
    """The source model of slim modules given as decomposition folders or module folders inside one."""
    found = {slim_source_dir(p) for p in paths}
    if len(found) != 1:
        raise UserError("--mode merged needs slim modules of one decomposition folder; these come from "
                        f"{len(found)}: use --mode fused (one merged network per model, their scores side by side)")
    return load_model(found.pop(), device)


@dataclass(frozen=True)
class ModuleKind:
    """How one kind of module is written to and read from its folder."""

    write: Callable[[Path, BinaryModule, str | None, str | None], dict]
    load: Callable[[Path, dict, dict[str, torch.Tensor], torch.device | str, SourceCache], BinaryModule]


# The module kinds, by granularity (a config without one is the paper's node-level module): a new kind of
# module is one entry here and one class implementing cnnmod.modules.base.BinaryModule.
MODULE_KINDS: dict[str, ModuleKind] = {"node": ModuleKind(_write_node, _load_node),
                                       "channel": ModuleKind(_write_slim, _load_slim)}
