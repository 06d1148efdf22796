"""The module contract: what every binary "my class / not my class" classifier offers, whatever its kind.

Two kinds implement it: the paper's node-level module (:class:`cnnmod.node.module.Module`: masks over its
source model, ``granularity = "node"``) and the slim module (:class:`cnnmod.slim.module.SlimModule`: a
physically smaller network, ``granularity = "channel"``). Composition, evaluation, cost, export and the
artifact store use only what is declared here; ``granularity`` names the kind in the store's table
(:mod:`cnnmod.io.store`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.calibrate import Typical, module_score
from ..data.registry import split_spec
from ..data.transforms import InputSpec, to_input


@dataclass(frozen=True)
class ClassRef:
    """One class of a module or composition: its data set (without a class list), its index in that data set,
    its name, and its index among its source model's outputs."""

    dataset: str
    source_class: int
    name: str
    index: int

    @property
    def qualified(self) -> str:
        """``dataset:name``, how a composition names its classes."""
        return f"{self.dataset}:{self.name}"

    @property
    def key(self) -> tuple[str, int]:
        """What makes two classes the same class: data set and index in it."""
        return (self.dataset, self.source_class)


@dataclass
class ModuleRecord:
    """What a module carries into its folder beside its weights: the settings it was made with, the metrics
    measured on it, its score calibration (a dict, see :mod:`cnnmod.core.calibrate`) and its in-distribution test
    (``typical``)."""

    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    calibration: dict | None = None
    typical: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, module: BinaryModule, **changed) -> ModuleRecord:
        """``module``'s record (copies of its dicts), with the fields in ``changed`` in place of its own."""
        return cls(**{"settings": dict(module.settings), "metrics": dict(module.metrics),
                      "calibration": module.calibration, "typical": module.typical, **changed})

    def apply(self, module: BinaryModule) -> None:
        """Give ``module`` this record's settings, metrics (copies), calibration and in-distribution test."""
        module.settings = dict(self.settings or {})
        module.metrics = dict(self.metrics or {})
        module.calibration = dict(self.calibration) if self.calibration else None
        module.typical = self.typical


def base_dataset(spec: str) -> str:
    """A data set spec without its class list (``fashion-mnist:0,3`` -> ``fashion-mnist``; ``custom`` if none)."""
    return split_spec(spec)[0] if spec else "custom"


class BinaryModule(Typical, nn.Module, ABC):
    """A binary classifier for one class: prepared input in, two-way logits [z_c, z_uc] out.

    ``score`` is p_c = sigmoid(z_c - z_uc), calibrated as asked; ``features`` is the head's input from one pass
    (``pooled`` collects every observation point's output averaged over positions, for the in-distribution
    test). ``calibration`` (a dict, see :mod:`cnnmod.core.calibrate`), ``typical`` (its in-distribution test),
    ``settings`` and ``metrics`` travel with it into its artifact.
    """

    granularity: ClassVar[str]  # the artifact kind: "node" or "channel" (:mod:`cnnmod.modules.kinds`)
    union_pass: ClassVar[bool] = False  # modules of one source can run as one pass through the union of what
                                        # they keep (:meth:`batched_features` with ``union``)

    concerned: int
    settings: dict
    metrics: dict
    calibration: dict | None

    # ------------------------------------------------------------------ what it is
    @property
    @abstractmethod
    def class_name(self) -> str: ...

    @property
    @abstractmethod
    def source_class(self) -> int:
        """The class's index in its source data set (differs from ``concerned`` when the model saw a subset)."""

    @property
    @abstractmethod
    def dataset(self) -> str:
        """The source model's data set spec (possibly with a class list)."""

    @property
    @abstractmethod
    def spec(self) -> InputSpec:
        """The input the module takes: shape and normalisation."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def ref(self) -> ClassRef:
        return ClassRef(base_dataset(self.dataset), self.source_class, self.class_name, self.concerned)

    @property
    @abstractmethod
    def source_key(self) -> Hashable:
        """Modules with the same key run together in one batched pass (:meth:`batched_features`)."""

    @property
    @abstractmethod
    def source_sha(self) -> str | None:
        """The sha256 of its source model's weights, as recorded."""

    @property
    @abstractmethod
    def source_model(self):
        """The source model it runs on (:class:`cnnmod.models.classifier.Classifier`), or None where it runs
        without one (a slim module)."""

    @property
    @abstractmethod
    def points(self) -> list:
        """The observation points its features pass through (:class:`cnnmod.core.graph.ObservationPoint`)."""

    # ------------------------------------------------------------------ inference
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) of any size and channel count -> the module's input."""
        return to_input(images, self.spec)

    def features(self, x: torch.Tensor, pooled: list | None = None) -> torch.Tensor:
        """The head's input (1, B, F) from one pass."""
        return type(self).batched_features([self], x, False, pooled)

    @classmethod
    @abstractmethod
    def batched_features(cls, modules: Sequence[BinaryModule], x: torch.Tensor, union: bool,
                         pooled: list | None = None) -> torch.Tensor:
        """The head inputs (K, B, F) of modules sharing one ``source_key``, from one batched pass; with
        ``union``, one pass through what any of them keeps, every head on the same features."""

    @classmethod
    def batched_logits(cls, modules: Sequence[BinaryModule], x: torch.Tensor, union: bool) -> torch.Tensor:
        """Two-way logits (K, B, 2) of modules sharing one ``source_key``, in one batched pass."""
        features = cls.batched_features(modules, x, union)
        weight = torch.stack([m.head_weight for m in modules])  # (K, 2, F)
        bias = torch.stack([m.head_bias for m in modules])      # (K, 2)
        return torch.einsum("kbf,kjf->kbj", features, weight) + bias[:, None, :]

    @property
    @abstractmethod
    def head_weight(self) -> torch.Tensor:
        """The two-way head's rows (2, F): [z_c, z_uc]."""

    @property
    @abstractmethod
    def head_bias(self) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0] @ self.head_weight.T + self.head_bias

    def score(self, x: torch.Tensor, calibration: str = "none") -> torch.Tensor:
        """p_c; ``calibration`` "temperature", "platt" or "platt-ood" applies the module's fitted calibration."""
        return module_score(self, x, calibration)

    # ------------------------------------------------------------------ cost
    @abstractmethod
    def kept_fraction(self) -> float:
        """What it keeps of its source model: nodes for a node-level module, parameters for a slim one."""

    @abstractmethod
    def shared_params(self) -> int:
        """Parameters it shares with the other modules of its ``source_key`` (counted once per key)."""

    @abstractmethod
    def own_params(self) -> int:
        """Parameters of its own (its head; or its whole smaller network)."""

    def params(self) -> int:
        """Parameters it needs to run alone."""
        return self.shared_params() + self.own_params()

    # ------------------------------------------------------------------ fitting and measures
    @abstractmethod
    def with_head(self, weight: torch.Tensor, bias: torch.Tensor, settings: dict) -> BinaryModule:
        """A copy of this module with the two-way head ``weight`` (2, F) and ``bias`` (2,) and ``settings``
        (its features, calibration and metrics as they are): how heads are refitted without knowing the kind."""

    @classmethod
    def pairwise_jaccard(cls, modules: Sequence[BinaryModule]) -> float | None:
        """The mean Jaccard index over pairs of modules of one source model, for kinds that keep parts of a
        shared model (None for the others)."""
        return None
