"""Slim compositions: slim modules of one model merged into one network (:class:`MergedSlim`), and merged
networks of several models side by side (:class:`FusedSlim`). :mod:`cnnmod.slim.make` makes them."""

from __future__ import annotations

import torch
from torch import nn

from ..composition.base import Composer
from ..data.transforms import InputSpec, to_input
from ..modules.base import ClassRef, base_dataset


class MergedSlim(Composer):
    """Slim modules of one source model as one network: the union of their kept channels, BatchNorm statistics
    re-estimated on it, and one refitted head row per class (its margin, class c vs the rest). ``forward`` takes
    uint8 images and returns scores p_c (B, K)."""

    mode = "merged"

    def __init__(self, net: nn.Module, classifier: str, spec: InputSpec, concerned: list[int], source_info: dict,
                 removed: dict[str, list[int]], settings: dict, metrics: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.classifier_name = classifier
        self.spec = spec
        self.concerned = list(concerned)
        self.source_info = dict(source_info)
        self.removed = {k: list(v) for k, v in removed.items()}
        self.settings = dict(settings)
        self.metrics = dict(metrics or {})

    @property
    def refs(self) -> list[ClassRef]:
        info, dataset = self.source_info, base_dataset(self.source_info.get("dataset", ""))
        return [ClassRef(dataset, info["source_classes"][c], info["class_names"][c], c) for c in self.concerned]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def source_shas(self) -> list[str | None]:
        return [self.source_info.get("weights_sha256")] * len(self.concerned)

    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def kept_fractions(self) -> list[float]:
        return [self.metrics["params_fraction"]] * len(self.concerned)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(to_input(images, self.spec)))


class FusedSlim(Composer):
    """Merged slim networks of several source models side by side (``compose --mode fused``): one pass of each,
    each scoring its own classes, fitted against all of the composition's other classes (its own model's and
    the other models'). ``forward`` takes uint8 images and returns the scores p_c (B, K) of every class, in the
    order of its parts."""

    mode = "fused"

    def __init__(self, parts: list[MergedSlim]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @property
    def refs(self) -> list[ClassRef]:
        return [r for p in self.parts for r in p.refs]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.parts[0].input_shape

    @property
    def source_shas(self) -> list[str | None]:
        return [sha for p in self.parts for sha in p.source_shas]

    def params(self) -> int:
        return sum(p.params() for p in self.parts)

    def kept_fractions(self) -> list[float]:
        return [f for p in self.parts for f in p.kept_fractions()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(images) for p in self.parts], 1)
