"""Composition (METHOD.md section 6): modules, from one model or several, become one classifier by voting.

Every module gives p_c; exactly one voter (p_c > 0.5) wins; among several voters the highest p_c wins; with no
voter the highest p_c wins. Modules of one source model run together in one batched pass (masks stacked).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .calibrate import MODES as CALIBRATIONS
from .calibrate import gated_score, score
from .data.registry import split_spec
from .errors import UserError
from .module import Module, masked_features


def vote(scores: torch.Tensor) -> torch.Tensor:
    """The winning column of each row of ``scores`` (B, K) under the voting rule; ties go to the lower index."""
    voters = scores > 0.5
    among_voters = torch.where(voters, scores, torch.full_like(scores, float("-inf"))).argmax(1)
    return torch.where(voters.any(1), among_voters, scores.argmax(1))


def base_dataset(m: Module) -> str:
    """The data set a module's class belongs to, without a class list (``fashion-mnist:0,3`` -> ``fashion-mnist``)."""
    return split_spec(m.dataset)[0] if m.dataset else "custom"


def class_key(m: Module) -> tuple[str, int]:
    return (base_dataset(m), m.source_class)


def qualified_name(m: Module) -> str:
    """``dataset:class``, how a composition names its classes."""
    return f"{base_dataset(m)}:{m.class_name}"


def check_composable(modules: Sequence[Module], replacing: bool = False) -> None:
    if not modules:
        raise UserError("a composition needs at least one module")
    shapes = {tuple(m.input_shape) for m in modules}
    if len(shapes) > 1:
        raise UserError("the modules take different input shapes (" + ", ".join("x".join(map(str, s)) for s in
                        sorted(shapes)) + "); compose modules whose models take the same input")
    if not replacing:
        seen: dict[tuple[str, int], Module] = {}
        for m in modules:
            key = class_key(m)
            if key in seen:
                raise UserError(f"two modules for class {key[1]} ({m.class_name}) of {key[0]}; keep one, or use "
                                "replace to swap a class's module")
            seen[key] = m


def check_calibration(modules: Sequence[Module], calibration: str, mode: str = "vote") -> None:
    if calibration not in CALIBRATIONS:
        raise UserError(f"unknown calibration {calibration!r}; choose {', '.join(CALIBRATIONS)}")
    if calibration != "none":
        missing = [m.class_name for m in modules if not m.calibration]
        if missing:
            raise UserError(f"the modules of {', '.join(missing[:3])} have no calibration; decompose with "
                            "--calibration-samples N (N > 0), or compose with --calibration none")
    if calibration == "platt-ood":
        missing = [m.class_name for m in modules if m.typical is None]
        if missing:
            raise UserError(f"the modules of {', '.join(missing[:3])} have no in-distribution test (modules made "
                            "before cnnmod had it have none): use --calibration platt, or decompose again")
        if mode != "vote":
            raise UserError("--calibration platt-ood measures each module's own activations: compose with --mode "
                            "vote")


MODES = ("vote", "merged", "fused")


def check_mode(modules: Sequence[Module], mode: str) -> None:
    """``vote``: the paper's (one masked pass per module, batched); ``merged``: the modules of one source model
    as one network (the union of their kept nodes, their heads), one pass; ``fused``: one merged pass per
    source model, their scores side by side."""
    if mode not in MODES:
        raise UserError(f"unknown composition mode {mode!r}; choose {', '.join(MODES)}")
    if mode == "vote":
        return
    if any(not isinstance(m, Module) for m in modules):
        raise UserError(f"--mode {mode} of this composition merges node-level modules; slim modules merge with "
                        "cnnmod compose --mode merged (one model) or --mode fused (several), and slim and "
                        "node-level modules together run with --mode vote")
    if mode == "merged" and len({id(m.source) for m in modules}) > 1:
        raise UserError("--mode merged needs modules of one source model; these come from several: use --mode fused "
                        "(one merged network per source model, their scores fused)")


class Composition(nn.Module):
    """A classifier over its modules' classes: uint8 images (B, C, H, W) -> scores p_c (B, K).

    ``classes`` are the source data sets' class indices, ``class_names`` their names, in module order;
    :meth:`predict` applies the voting rule.
    """

    def __init__(self, modules: Sequence[Module], replacing: bool = False, calibration: str = "none",
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
                if not isinstance(m, Module):
                    m.points()
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(modules):  # node-masked modules of one source run together; a slim module alone
            groups.setdefault(id(m.source) if isinstance(m, Module) else id(m), []).append(i)
        self.groups = list(groups.values())

    @property
    def modules_list(self) -> list[Module]:
        return list(self.parts)

    @property
    def classes(self) -> list[int]:
        return [m.source_class for m in self.parts]

    @property
    def class_names(self) -> list[str]:
        return [m.class_name for m in self.parts]

    @property
    def datasets(self) -> list[str]:
        return [base_dataset(m) for m in self.parts]

    @property
    def qualified_names(self) -> list[str]:
        return [qualified_name(m) for m in self.parts]

    @property
    def max_group(self) -> int:
        return max(len(g) for g in self.groups)

    def group_logits(self, group: list[int], images: torch.Tensor) -> torch.Tensor:
        """Two-way logits (K, B, 2) of one source model's modules, in one batched pass."""
        parts = [self.parts[i] for i in group]
        if not isinstance(parts[0], Module):  # a slim module: its own smaller network
            return parts[0](parts[0].prepare(images)).unsqueeze(0)
        features = self.group_features(group, images)
        weight = torch.stack([p.head_weight for p in parts])  # (K, 2, F)
        bias = torch.stack([p.head_bias for p in parts])      # (K, 2)
        return torch.einsum("kbf,kjf->kbj", features, weight) + bias[:, None, :]

    def group_features(self, group: list[int], images: torch.Tensor, pooled: list | None = None) -> torch.Tensor:
        """What the heads of one source model's node-masked modules see: (K, B, F), in one batched pass, or a
        slim module's head (1, B, F) (``pooled``: see :func:`masked_features`)."""
        parts = [self.parts[i] for i in group]
        first = parts[0]
        x = first.prepare(images)
        if not isinstance(first, Module):  # a slim module: its own smaller network
            return first.features(x, pooled)
        if self.mode == "vote":  # the paper: every module its own masked pass (batched)
            masks = {name: torch.stack([p.masks[name] for p in parts]) for name in first.point_names}
        else:  # one pass with the union of the modules' kept nodes, every head on the same features
            masks = {name: torch.stack([p.masks[name] for p in parts]).any(0, keepdim=True)
                     for name in first.point_names}
        features = masked_features(first.source.net, first.points, first.classifier_name, masks, x, pooled)
        return features.expand(len(parts), -1, -1)

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

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return vote(self.forward(images))


def compose(modules: Sequence[Module], replacing: bool = False, calibration: str = "none",
            mode: str = "vote") -> Composition:
    """Compose modules (any classes, from any models that take the same input) into one classifier; with
    ``calibration`` "temperature", "platt" or "platt-ood" the modules' calibrated scores are compared; ``mode``
    "merged" or "fused" runs each source model's modules as one network (see :func:`check_mode`)."""
    return Composition(modules, replacing, calibration, mode)
