"""Composition by voting (docs/method.md, "Composition"): modules, from one model or several, become one
classifier.

Every module gives p_c; exactly one voter (p_c > 0.5) wins; among several voters the highest p_c wins; with no
voter the highest p_c wins. Modules of one source model run together in one batched pass (masks stacked); with
``mode="merged"`` node-level modules of one model run as one pass through the union of their kept nodes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import nn

from ..core.calibrate import MODES as CALIBRATIONS
from ..core.calibrate import gated_score, score
from ..errors import UserError
from ..modules.base import BinaryModule, ClassRef
from .base import Composer


def check_composable(modules: Sequence[BinaryModule], replacing: bool = False) -> None:
    if not modules:
        raise UserError("a composition needs at least one module")
    shapes = {tuple(m.input_shape) for m in modules}
    if len(shapes) > 1:
        raise UserError("the modules take different input shapes (" + ", ".join("x".join(map(str, s)) for s in
                        sorted(shapes)) + "); compose modules whose models take the same input")
    if not replacing:
        seen: dict[tuple[str, int], BinaryModule] = {}
        for m in modules:
            key = m.ref.key
            if key in seen:
                raise UserError(f"two modules for class {key[1]} ({m.class_name}) of {key[0]}; keep one, or use "
                                "replace to swap a class's module")
            seen[key] = m


def check_calibration(modules: Sequence[BinaryModule], calibration: str, mode: str = "vote") -> None:
    if calibration not in CALIBRATIONS:
        raise UserError(f"unknown calibration {calibration!r}; choose {', '.join(CALIBRATIONS)}")
    if calibration != "none":
        missing = [m.class_name for m in modules if not m.calibration]
        if missing:
            raise UserError(f"the modules of {', '.join(missing[:3])} have no calibration; decompose with "
                            "«calibration_samples» N (N > 0), or compose with «calibration» none")
    if calibration == "platt-ood":
        missing = [m.class_name for m in modules if m.typical is None]
        if missing:
            raise UserError(f"the modules of {', '.join(missing[:3])} have no in-distribution test (modules made "
                            "before cnnmod had it have none): use «calibration» platt, or decompose again")
        if mode != "vote":
            raise UserError("«calibration» platt-ood measures each module's own activations: compose with «mode» "
                            "vote")


def check_mode(modules: Sequence[BinaryModule], mode: str) -> None:
    """``vote``: the paper's (one masked pass per module, batched per source model); ``merged``: the modules of
    one source model as one pass through the union of what they keep (modules with a ``union_pass``), their
    heads on it; ``fused``: one such pass per source model, their scores side by side."""
    if mode not in ("vote", "merged", "fused"):
        raise UserError(f"a composition of modules runs in «mode» vote, merged or fused, not {mode!r}")
    if mode == "vote":
        return
    if not all(m.union_pass for m in modules):
        kept = next(m for m in modules if not m.union_pass)
        raise UserError(f"{kept.ref.qualified} keeps no part of a shared model, so it cannot run in one pass with "
                        "the others: compose with «mode» vote")
    if mode == "merged" and len({m.source_key for m in modules}) > 1:
        raise UserError("«mode» merged needs modules of one source model; these come from several: use «mode» fused "
                        "(one merged network per source model, their scores fused)")


class Composition(Composer):
    """A classifier over its modules' classes: uint8 images (B, C, H, W) -> scores p_c (B, K), in module order."""

    def __init__(self, modules: Sequence[BinaryModule], replacing: bool = False, calibration: str = "none",
                 mode: str = "vote") -> None:
        super().__init__()
        check_composable(modules, replacing)
        check_mode(modules, mode)
        check_calibration(modules, calibration, mode)
        self.calibration = calibration
        self.mode = mode
        self.parts = nn.ModuleList(modules)
        if calibration == "platt-ood":
            for m in modules:
                m.points  # noqa: B018 -- traced now, so that exporting never traces inside a trace
        groups: dict[Hashable, list[int]] = {}
        for i, m in enumerate(modules):  # modules of one source run together (a slim module is its own source)
            groups.setdefault(m.source_key, []).append(i)
        self.groups = list(groups.values())

    # ---------------------------------------------------------------- the contract
    @property
    def modules_list(self) -> list[BinaryModule]:
        return list(self.parts)

    @property
    def refs(self) -> list[ClassRef]:
        return [m.ref for m in self.parts]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.parts[0].input_shape

    @property
    def sources(self) -> list:
        found = {id(m.source_model): m.source_model for m in self.parts if m.source_model is not None}
        return list(found.values())

    @property
    def source_shas(self) -> list[str | None]:
        return [m.source_sha for m in self.parts]

    @property
    def variant(self) -> str:
        made = self.parts[0].settings
        return made.get("variant", made.get("granularity"))

    def params(self) -> int:
        shared = {}
        for m in self.parts:
            shared.setdefault(m.source_key, m.shared_params())
        return sum(shared.values()) + sum(m.own_params() for m in self.parts)

    def kept_fractions(self) -> list[float]:
        return [m.kept_fraction() for m in self.parts]

    @property
    def passes(self) -> int:
        return max(len(g) for g in self.groups)

    def separately(self) -> list[tuple[Hashable, Composer]] | None:
        if self.mode != "vote":
            return None
        return [(id(m), Composition([m], calibration=self.calibration)) for m in self.parts]

    def pairwise_jaccard(self) -> float | None:
        kinds = {type(m) for m in self.parts}
        if len(kinds) > 1 or len({m.source_key for m in self.parts}) > 1:
            return None
        return kinds.pop().pairwise_jaccard(self.modules_list)

    # ---------------------------------------------------------------- batched passes, per source model
    def group_logits(self, group: list[int], images: torch.Tensor) -> torch.Tensor:
        """Two-way logits (K, B, 2) of one source model's modules, in one batched pass."""
        parts = [self.parts[i] for i in group]
        return type(parts[0]).batched_logits(parts, parts[0].prepare(images), self.mode != "vote")

    def group_features(self, group: list[int], images: torch.Tensor, pooled: list | None = None) -> torch.Tensor:
        """What the heads of one source model's modules see: (K, B, F), in one batched pass (``pooled``: see
        :func:`cnnmod.node.module.masked_features`)."""
        parts = [self.parts[i] for i in group]
        return type(parts[0]).batched_features(parts, parts[0].prepare(images), self.mode != "vote", pooled)

    def group_layers(self, group: list[int], images: torch.Tensor) -> list[list[torch.Tensor]]:
        """For each of one source's modules, in one batched pass: every observation point's pooled masked
        output, then the head's input, each (B, F): what the in-distribution test (platt-ood) measures."""
        pooled: list[torch.Tensor] = []
        features = self.group_features(group, images, pooled)
        pooled = [p.expand(len(group), -1, -1) for p in pooled]  # merged: one pass for every module
        return [[p[j] for p in pooled] + [features[j]] for j in range(len(group))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.empty(images.shape[0], len(self.parts), device=images.device)
        for group in self.groups:
            if self.calibration == "platt-ood":
                parts = [self.parts[i] for i in group]
                layers = self.group_layers(group, images)
                p = torch.stack([gated_score(m, layer) for m, layer in zip(parts, layers, strict=True)])
                scores[:, group] = p.T.to(scores.dtype)
                continue
            logits = self.group_logits(group, images)  # (K, B, 2)
            p = torch.stack([score(logits[j], self.parts[i].calibration, self.calibration)
                             for j, i in enumerate(group)])
            scores[:, group] = p.T.to(scores.dtype)
        return scores


def compose(modules: Sequence[BinaryModule], replacing: bool = False, calibration: str = "none",
            mode: str = "vote") -> Composition:
    """Compose modules (any classes, from any models that take the same input) into one classifier; with
    ``calibration`` "temperature", "platt" or "platt-ood" the modules' calibrated scores are compared; ``mode``
    "merged" runs one source model's node-level modules as one network (see :func:`check_mode`)."""
    return Composition(modules, replacing, calibration, mode)
