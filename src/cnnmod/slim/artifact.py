"""Slim module and slim composition folders: a slim module holds its own network (its source's architecture,
sliced as recorded: ``removed``) and loads without its source model; a merged slim composition is one such network
with a head row per class, its source model beside it for comparisons; a fused one holds a merged one per source
model under ``parts/``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..artifacts import SOURCES_DIR, atomic_folder, read_artifact, write_into
from ..core.attention import parse_heads
from ..core.averaged_heads import slicing_form
from ..core.graph import ModelGraph
from ..data.transforms import InputSpec
from ..models import build
from ..models.classifier import Classifier
from ..models.folder import SourceCache, load_model, load_weights, save_into
from ..models.reference import allows_code
from ..modules.base import ModuleRecord
from ..modules.kinds import detector_lines, typical_of, typical_tensors
from .channels import slice_network
from .merged import FusedSlim, MergedSlim
from .module import SlimModule
from .units import find_chains, find_units

PARTS_DIR = "parts"


def write_slim(folder: Path, m: SlimModule, source_rel: str | None, source_sha: str | None) -> dict:
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
                      *([f"- made with the recipe {m.settings['recipe']!r} (cnnmod decompose --recipe; the default, "
                         "best, takes cheap at --size 0.5 and above, small below)"]
                        if m.settings.get("recipe") else []),
                      *_whole_lines(m.metrics), *_learned_lines(m.settings), *detector_lines(m.metrics), ""])


def _whole_lines(metrics: dict) -> list[str]:
    """The layers kept whole (attention whose heads cnnmod cannot cut, modules torch.fx cannot trace into: all
    of each stays; the network around them was cut), each with why."""
    whole = metrics.get("whole") or {}
    if not whole:
        return []
    return [f"- kept whole ({len(whole)} layer{'s' * (len(whole) > 1)}: cnnmod cannot cut inside them; the MLPs "
            "and channels around them were cut):",
            *[f"  - {layer}: {why}" for layer, why in whole.items()]]


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


def build_sliced(config: dict, outputs: int = 2) -> nn.Module:
    """The network of a saved slim module (or, with ``outputs`` rows, merged slim composition): its source
    architecture, attention in the form slicing keeps, sliced as recorded (weights to be loaded)."""
    info, shape = config["source"], _input_shape(config)
    net = build(info["arch"], shape, len(info["class_names"]), **info["arch_args"]).eval()
    net = slicing_form(net, parse_heads((config.get("settings") or {}).get("heads")), shape,
                       whole=(config.get("metrics") or {}).get("whole"))
    graph = ModelGraph(net, shape)
    chains = set((config.get("metrics") or {}).get("chains") or ())  # sliced by cnnmod, not torch-pruning
    units = {**find_units(graph), **{r: u for r, u in find_chains(graph).items() if r in chains}}
    return slice_network(net, shape, config["removed"], graph.head, None, None, outputs=outputs, units=units)


def build_merged(config: dict) -> nn.Module:
    """The network of a saved merged slim composition (weights to be loaded)."""
    return build_sliced(config, outputs=len(config["concerned"]))


def load_slim(path: Path, config: dict, tensors: dict[str, torch.Tensor], device: torch.device | str,
               sources: SourceCache) -> SlimModule:
    net = build_sliced(config)
    load_weights(net, {k: v for k, v in tensors.items() if not k.startswith("typical.")},
                 f"slim {config['source']['arch']}", path)
    record = ModuleRecord(config.get("settings") or {}, config.get("metrics") or {}, config.get("calibration"),
                          typical_of(tensors))
    m = SlimModule(net, config["classifier"], InputSpec.from_dict(config["input"]), config["class_name"],
                   config["concerned_class"], config["source"], config["removed"], record)
    return m.to(device).eval()


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
                      "source model's)", *_whole_lines(merged.metrics or {}), *_learned_lines(merged.settings), ""])
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


def save_merged(merged: MergedSlim, sources: list[Classifier], out: str | os.PathLike, overwrite: bool = False,
                 extra: dict | None = None) -> dict:
    return save_merged_slim(merged, sources[0], out, overwrite, extra)


def load_merged(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[MergedSlim, list]:
    merged, source = load_merged_slim(path, device)
    return merged, [source]

