"""The slim module: a physically smaller network for one class, cut from its source model without retraining.

It loads and runs without its source model (:mod:`cnnmod.slim.make` makes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.graph import Head, ModelGraph
from ..core.layers import copied
from ..core.masking import masked_features
from ..data.transforms import InputSpec
from ..modules.base import BinaryModule, ModuleRecord


class SlimModule(BinaryModule):
    """A physically smaller network for one class: ``forward(x)`` -> logits (B, 2) [z_c, z_uc] from its own head."""

    granularity = "channel"

    def __init__(self, net: nn.Module, classifier: str, spec: InputSpec, class_name: str, concerned: int,
                 source_info: dict, removed: dict[str, list[int]], record: ModuleRecord | None = None) -> None:
        super().__init__()
        self.net = net
        self.classifier_name = classifier
        self._spec = spec
        self._class_name = class_name
        self.concerned = concerned
        self.source_info = dict(source_info)  # arch, args, dataset, class names, source classes, weights sha256
        self.removed = {k: list(v) for k, v in removed.items()}
        (record or ModuleRecord()).apply(self)  # settings, metrics, calibration, in-distribution test

    @property
    def class_name(self) -> str:
        return self._class_name

    @property
    def source_class(self) -> int:
        return self.source_info["source_classes"][self.concerned]

    @property
    def spec(self) -> InputSpec:
        return self._spec

    @property
    def dataset(self) -> str:
        return self.source_info.get("dataset", "")

    @property
    def source_key(self) -> int:
        return id(self)  # its own network: it runs alone

    @property
    def source_model(self) -> None:
        return None

    @property
    def source_sha(self) -> str | None:
        return self.source_info.get("weights_sha256")

    @property
    def points(self) -> list:
        """Its own network's observation points (traced on first use; a composition traces them when it is
        made, so that exporting it never traces inside a trace)."""
        if not hasattr(self, "_points"):
            self._points = ModelGraph(self.net, self.spec.shape).points
        return self._points

    @property
    def head_weight(self) -> torch.Tensor:
        return self.net.get_submodule(self.classifier_name).weight

    @property
    def head_bias(self) -> torch.Tensor:
        return self.net.get_submodule(self.classifier_name).bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def batched_features(cls, modules: Sequence[SlimModule], x: torch.Tensor, union: bool,
                         pooled: list | None = None) -> torch.Tensor:
        """Its own network's head input (1, B, F); ``pooled`` receives every observation point's output of it,
        averaged over positions, (1, B, channels) (as :func:`cnnmod.node.module.masked_features`)."""
        (m,) = modules  # each slim module is its own source
        masks = {p.name: torch.ones(1, *p.shape, dtype=torch.bool, device=x.device) for p in m.points}
        return masked_features(m.net, m.points, Head(m.classifier_name, None), masks, x, pooled)

    @classmethod
    def batched_logits(cls, modules: Sequence[SlimModule], x: torch.Tensor, union: bool) -> torch.Tensor:
        (m,) = modules
        return m(x).unsqueeze(0)

    def with_head(self, weight: torch.Tensor, bias: torch.Tensor, settings: dict) -> SlimModule:
        net = copied(self.net)
        layer = net.get_submodule(self.classifier_name)
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight))
            layer.bias.copy_(bias.to(layer.bias))
        return SlimModule(net, self.classifier_name, self.spec, self.class_name, self.concerned, self.source_info,
                          self.removed, ModuleRecord.of(self, settings=settings)).eval()

    def kept_fraction(self) -> float:
        """The share of the source model's parameters this module keeps."""
        return self.params() / self.source_info["params"]

    def shared_params(self) -> int:
        return 0

    def own_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())
