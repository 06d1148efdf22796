"""The node-level module (the paper's): a source model with some nodes switched off and a two-way head.

A module does not copy its source's weights: it holds, per observation point, a boolean mask of the nodes it
keeps (a switched-off node is forced to 0 at inference; docs/method.md, "Nodes and observation points") and
the two rows of its binary head (``z_c``: the class's own row; ``z_uc``: the mean of the other rows). Several
modules of one source run together in one batched pass (:func:`masked_features`): the input is repeated
once per module and each copy
sees its own masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.bits import or_rows, pack_bits, unpack_bits
from ..core.graph import Head, ModelGraph, ObservationPoint
from ..core.masking import masked_features
from ..data.transforms import InputSpec
from ..models.classifier import Classifier
from ..modules.base import BinaryModule, ModuleRecord


class Module(BinaryModule):
    """A binary classifier for one class of a source model: masks at the observation points plus a two-way head.

    ``forward`` takes the source model's normalised input and returns logits (B, 2): [z_c, z_uc];
    :meth:`score` returns p_c = softmax([z_c, z_uc])[0]; the module votes "mine" where p_c > 0.5.
    """

    def __init__(self, source: Classifier, graph: ModelGraph, concerned: int, masks: dict[str, torch.Tensor],
                 head_weight: torch.Tensor, head_bias: torch.Tensor, record: ModuleRecord | None = None) -> None:
        super().__init__()
        self.source = source
        self.graph = graph
        self.concerned = int(concerned)
        self.point_names = [p.name for p in graph.points]
        missing = [n for n in self.point_names if n not in masks]
        if missing:
            raise ValueError(f"masks missing for {missing[:3]}")
        for i, p in enumerate(graph.points):  # held packed, 8 nodes a byte (cnnmod.core.bits)
            m = masks[p.name]
            if tuple(m.shape) != p.shape:
                raise ValueError(f"mask of {p.name} is {tuple(m.shape)}, the point is {p.shape}")
            self.register_buffer(f"packed_{i}", pack_bits(m.reshape(-1).to(torch.bool)), persistent=False)
        self.register_buffer("_head_weight", head_weight.float(), persistent=False)
        self.register_buffer("_head_bias", head_bias.float(), persistent=False)
        (record or ModuleRecord()).apply(self)  # settings, metrics, calibration, in-distribution test

    granularity = "node"
    union_pass = True

    # ---------------------------------------------------------------- what it is
    @property
    def class_name(self) -> str:
        return self.source.class_names[self.concerned]

    @property
    def source_class(self) -> int:
        """The class's index in the source data set (differs from ``concerned`` when the model saw a subset)."""
        return self.source.source_classes[self.concerned]

    @property
    def spec(self) -> InputSpec:
        return self.source.spec

    @property
    def dataset(self) -> str:
        return self.source.dataset

    @property
    def source_key(self) -> int:
        return id(self.source)

    @property
    def source_model(self) -> Classifier:
        return self.source

    @property
    def source_sha(self) -> str | None:
        return self.source.info.get("weights_sha256")

    @property
    def head_weight(self) -> torch.Tensor:
        return self._head_weight

    @property
    def head_bias(self) -> torch.Tensor:
        return self._head_bias

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Per observation point, the bool mask of kept nodes (unpacked when asked for)."""
        return {p.name: self.mask(i) for i, p in enumerate(self.points)}

    def mask(self, i: int) -> torch.Tensor:
        p = self.points[i]
        return unpack_bits(getattr(self, f"packed_{i}"), p.size).reshape(p.shape)

    @property
    def packed_masks(self) -> dict[str, torch.Tensor]:
        """Per observation point, the kept nodes packed eight a byte (:func:`cnnmod.core.bits.pack_bits`)."""
        return {n: getattr(self, f"packed_{i}") for i, n in enumerate(self.point_names)}

    @property
    def points(self) -> list[ObservationPoint]:
        return self.graph.points

    @property
    def classifier_name(self) -> str:
        return self.graph.classifier

    @property
    def head(self) -> Head:
        return self.graph.head

    def kept_nodes(self) -> int:
        return sum(int(self.mask(i).sum()) for i in range(len(self.point_names)))  # one point unpacked at a time

    def total_nodes(self) -> int:
        return sum(math.prod(p.shape) for p in self.points)

    def kept_fraction(self) -> float:
        """Jaccard index against the model (docs/method.md, "Measures"): kept nodes / all nodes."""
        return self.kept_nodes() / self.total_nodes()

    def shared_params(self) -> int:
        return sum(p.numel() for p in self.source.net.parameters())

    def own_params(self) -> int:
        return self.head_weight.numel() + self.head_bias.numel()

    @classmethod
    def pairwise_jaccard(cls, modules: Sequence[Module]) -> float | None:
        """Mean Jaccard index over all pairs of modules of one source model (None with fewer than two)."""
        flats = [m.flat_mask() for m in modules]
        values = [jaccard(flats[i], flats[j]) for i in range(len(flats)) for j in range(i + 1, len(flats))]
        return sum(values) / len(values) if values else None

    def with_head(self, weight: torch.Tensor, bias: torch.Tensor, settings: dict) -> Module:
        copy = Module(self.source, self.graph, self.concerned, {k: v.cpu() for k, v in self.masks.items()}, weight,
                      bias, ModuleRecord.of(self, settings=settings))
        return copy.to(self.head_weight.device)

    def flat_mask(self) -> torch.Tensor:
        return torch.cat([self.mask(i).reshape(-1).cpu() for i in range(len(self.point_names))])

    # ---------------------------------------------------------------- inference
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return self.source.prepare(images)

    @classmethod
    def batched_features(cls, modules: Sequence[Module], x: torch.Tensor, union: bool,
                         pooled: list | None = None) -> torch.Tensor:
        """The paper's way (every module its own masked pass, batched: masks stacked) or, with ``union``, one pass
        with the union of the modules' kept nodes, every head on the same features."""
        first = modules[0]
        memo = getattr(first, "_union_memo", None)
        device = first.head_weight.device
        if union and memo is not None and memo[0] == tuple(modules) and memo[1] == device:
            masks = memo[2]  # a merged composition's union, computed at its first pass
        else:
            masks = {}
            for i, p in enumerate(first.points):  # from the packed bytes: a union is a bitwise or of them
                rows = [getattr(m, f"packed_{i}") for m in modules]
                packed = or_rows(rows).unsqueeze(0) if union else torch.stack(rows)
                masks[p.name] = unpack_bits(packed, p.size).reshape(-1, *p.shape)
            if union:  # one mask set however many modules: kept (masks never change once made)
                first._union_memo = (tuple(modules), device, masks)
        features = masked_features(first.source.net, first.points, first.head, masks, x, pooled)
        return features.expand(len(modules), -1, -1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A and B| / |A or B| of two boolean masks (1.0 for two empty masks)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0

