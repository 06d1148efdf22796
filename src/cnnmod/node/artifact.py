"""Node-level module folders: the paper's masks, bit-packed (zlib-compressed where that pays), and the two-way
head; the module points at its source model by a relative path and the source's weights sha256."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import write_into
from ..core.bits import pack_bits, unpack_bits
from ..errors import UserError
from ..models.folder import SourceCache
from ..modules.base import ModuleRecord
from ..modules.kinds import detector_lines, typical_of, typical_tensors
from .module import Module


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


def module_card(m: Module) -> str:
    on = m.source.dataset or "custom data"
    lines = [f"# Module: {m.class_name} (class {m.concerned}) of {m.source.arch} on {on}",
             "", "A cnnmod module: a binary classifier, \"my class\" vs \"not my class\", made from the source "
             "model without retraining (Pan & Rajan, ICSE 2022).", "",
             f"- variant: {m.settings.get('variant')}",
             f"- kept nodes: {m.kept_nodes()} of {m.total_nodes()} ({100 * m.kept_fraction():.2f}%)"]
    lines += detector_lines(m.metrics)
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


def write_node(folder: Path, m: Module, source_rel: str | None, source_sha: str | None) -> dict:
    return write_into(folder, "module", module_config(m, source_rel, source_sha), module_tensors(m), module_card(m))


def load_node(path: Path, config: dict, tensors: dict[str, torch.Tensor], device: torch.device | str,
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
    record = ModuleRecord(config.get("settings") or {}, config.get("metrics") or {}, config.get("calibration"), typical)
    m = Module(clf, graph, config["concerned_class"], masks, head_w, head_b, record)
    return m.to(device)

