"""What a pruner's current network keeps of its source network, in the source's numbering: the channels it
keeps and removed, and which outputs and head features stay (what a recovery maps the source's weights through).
A part of :class:`~cnnmod.slim.pruner.Pruner`: it reads the pruner's ``source``, ``s``, ``source_groups``,
``origin``, ``gates``, ``graph`` and ``w``."""

from __future__ import annotations

import torch
from torch import nn

from ..core.attention import HeadAttention, is_attention, parse_heads
from ..core.averaged_heads import LAYER, slicing_form
from ..core.folding import has_linear_norms
from ..core.layers import copied
from .channels import narrowed


class ChannelMap:
    """The current network's channels against the source network's (``origin``: per group, the source's index of
    each channel the current network has)."""

    def reference(self) -> nn.Module:
        """The source network with its layers named as the pruner's are: in the form slicing keeps
        (:func:`cnnmod.core.averaged_heads.slicing_form`; the source itself where it has nothing to convert)."""
        if not hasattr(self, "_reference"):
            net = self.source.net
            if self.graph.head.layer == LAYER or has_linear_norms(net) or any(
                    is_attention(m) and not isinstance(m, HeadAttention) for m in net.modules()):
                net = slicing_form(copied(net).eval(), parse_heads(self.s.heads), self.source.spec.shape)
            self._reference = net
        return self._reference

    def layout(self) -> dict:
        """How the source network was read, as a module records it in its metrics so that loading builds the same
        network: ``whole`` ({layer: why}: attention it cannot cut, modules torch.fx cannot trace into) and
        ``chains`` (the roots of the chains cnnmod sliced itself), each only where there are any."""
        g = self.source_groups
        return {**({"whole": dict(g.whole)} if g.whole else {}), **({"chains": list(g.chains)} if g.chains else {})}

    def kept_channels(self) -> int:
        return sum(int((g > 0).sum()) for g in self.gates)

    @property
    def channels(self) -> int:
        """The source network's channels in all groups."""
        return sum(g.channels for g in self.source_groups.groups)

    def removed(self) -> dict[str, list[int]]:
        """The closed channels of every group of the source network, by the group's first root layer."""
        out = {}
        for group, gate, origin in zip(self.source_groups.groups, self.gates, self.origin, strict=True):
            closed = torch.ones(group.channels, dtype=torch.bool)
            closed[origin[gate.cpu() > 0]] = False
            out[group.root] = [int(j) for j in torch.nonzero(closed).flatten()]
        return out

    def source_masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """:func:`~cnnmod.slim.channels.narrowed`'s masks for the source network narrowed to the current one's
        channels (closed channels it still has, gated, count as kept)."""
        kept = [torch.zeros(g.channels).index_fill_(0, o, 1.0)
                for g, o in zip(self.source_groups.groups, self.origin, strict=True)]
        return narrowed(self.source_groups, self.reference(), kept)[1]

    def kept_outputs(self) -> dict[str, torch.Tensor]:
        """Per layer of the source network that lost channels in the current network: the indices of its outputs
        that stay."""
        return {layer: torch.nonzero(m).flatten() for layer, m in self.source_masks()["outputs"].items()}

    def head_columns(self) -> torch.Tensor:
        """The indices of the source network's head features that the current network computes, in its order."""
        mask = self.source_masks()["consumers"].get(self.graph.head.layer)
        return torch.arange(self.w.shape[1]) if mask is None else torch.nonzero(mask).flatten()
