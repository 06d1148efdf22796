"""Units of a transformer that a slim module keeps or drops (docs/method.md, "Modules of a transformer"): whole
attention heads (of attention in its canonical form, :mod:`cnnmod.core.attention`) and the hidden units of a
two-layer MLP: a linear layer (or 1x1 convolution) whose outputs reach one other such layer only through
elementwise activations and dropout (GELU, SiLU, ...); sliced by cutting the first layer's rows and the second's
columns. The residual width, the embeddings and the class token always stay.

Where torch-pruning cannot trace a network at all (ShuffleNetV2's channel split and shuffle), the channels that
never leave a **chain** are sliced here too (:func:`find_chains`): a convolution whose outputs reach one other
convolution only through BatchNorms, elementwise activations and depthwise convolutions, each used once; cut as
the convolution's rows, those layers' channels and the reader's columns.

Each unit group says, as :class:`cnnmod.slim.channels.ChannelGroups` needs it, which layers read its units
(``consumers``) and which compute them (``outputs``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..core.attention import ConcatHeads, HeadAttention, cut_linear
from .groups import ChannelGroup


# ------------------------------------------------------------------------------------------------ unit groups
@dataclass(frozen=True)
class Unit:
    """A group of units slicing cuts together: ``root`` names it (the attention layer, or the MLP's first layer),
    ``channels`` counts them; ``consumers`` and ``outputs`` as :class:`cnnmod.slim.channels.ChannelGroups` keeps
    them ((layer, index, unit) of the layers that read, and that compute, the units)."""

    root: str
    kind: str  # "heads", "hidden" or "chain"
    channels: int
    reader: str  # the layer that reads the units (the projection, the MLP's second layer)
    width: int  # features per unit (head_dim; 1 for hidden units)
    through: tuple[str, ...] = ()  # a chain's BatchNorms and depthwise convolutions, cut with it

    def group(self) -> ChannelGroup:
        per = torch.arange(self.channels * self.width)
        unit = per // self.width
        if self.kind == "heads":
            n = self.channels * self.width
            rows = torch.cat([part * n + per for part in range(3)])
            computes = [(f"{self.root}.qkv", rows, unit.repeat(3))]
        else:
            computes = [(self.root, per, unit), *[(name, per, unit) for name in self.through]]
        return ChannelGroup([self.root], [], self.channels, [(self.reader, per, unit)], computes, self.kind)

    def cut(self, net: nn.Module, removed: list[int]) -> None:
        """Slice ``net`` (in place) to the units not in ``removed``."""
        first = net.get_submodule(self.root)
        n = first.num_heads if self.kind == "heads" else _outputs(first)  # as many as the network has now
        keep = torch.tensor([i for i in range(n) if i not in set(removed)], dtype=torch.long)
        if self.kind == "heads":
            attn = first
            attn.keep_heads(keep)
            if self.reader != f"{self.root}.proj":  # the projection after the layer reads the heads
                cols = (keep[:, None] * self.width + torch.arange(self.width)).flatten()
                _replace(net, self.reader, cut_linear(net.get_submodule(self.reader), cols=cols))
            return
        if self.kind == "chain":  # in place, so that every layer keeps its own class
            _narrow(first, rows=keep)
            for name in self.through:
                _narrow(net.get_submodule(name), rows=keep)
            _narrow(net.get_submodule(self.reader), cols=keep)
            return
        _replace(net, self.root, cut_linear(net.get_submodule(self.root), rows=keep))
        _replace(net, self.reader, cut_linear(net.get_submodule(self.reader), cols=keep))


def _narrow(m: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """``m`` (a convolution, a depthwise one or a BatchNorm) cut in place to its output channels ``rows`` (and
    a depthwise convolution's inputs with them) or its input channels ``cols``."""
    def keep(t, index, dim=0):
        return None if t is None else t.detach().index_select(dim, index.to(t.device)).clone()

    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(m, name, nn.Parameter(keep(getattr(m, name), rows)))
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                setattr(m, name, keep(getattr(m, name), rows))
        m.num_features = int(rows.numel())
        return
    if rows is not None:
        m.weight = nn.Parameter(keep(m.weight, rows))
        if m.bias is not None:
            m.bias = nn.Parameter(keep(m.bias, rows))
        m.out_channels = int(rows.numel())
        if m.groups > 1:  # depthwise: each output reads its own input
            m.in_channels = m.groups = int(rows.numel())
    else:
        m.weight = nn.Parameter(keep(m.weight, cols, 1))
        m.in_channels = int(cols.numel())


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)


_ELEMENTWISE = ("relu", "other_activation", "identity")  # the op table's kinds an MLP's hidden units pass


def find_units(graph) -> dict[str, Unit]:
    """The unit groups of a :class:`~cnnmod.core.graph.ModelGraph` (traced with attention layers as leaves), by
    root: the heads of every :class:`HeadAttention` with a projection of its own, and the hidden units of every
    linear layer (or 1x1 convolution, groups 1) whose only use reaches one other such layer through elementwise
    activations and dropout alone (never the classifier)."""
    units: dict[str, Unit] = {}
    gm = graph.gm
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, HeadAttention):
            reader = f"{node.target}.proj" if not isinstance(m.proj, ConcatHeads) else _reader(graph, node, True)
            if reader is not None and m.num_heads > 1:
                units[node.target] = Unit(node.target, "heads", m.num_heads, reader, m.head_dim)
            continue
        if node.target == graph.head.layer or not _pointwise(m):
            continue
        reader = _reader(graph, node)
        if reader is not None and reader != graph.head.layer and _pointwise(gm.get_submodule(reader)):
            units[node.target] = Unit(node.target, "hidden", _outputs(m), reader, 1)
    return units


def _dense_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1


def find_chains(graph) -> dict[str, Unit]:
    """The chains of a :class:`~cnnmod.core.graph.ModelGraph`, by root: a convolution (one group, not the
    classifier) whose output, each node used once, reaches one other such convolution through BatchNorms,
    elementwise activations, dropout and depthwise convolutions alone."""
    gm, chains = graph.gm, {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target == graph.head.layer or not _dense_conv(gm.get_submodule(
                node.target)):
            continue
        through, reader, at = [], None, node
        while reader is None:
            users = list(at.users)
            if len(users) != 1:
                break
            (at,) = users
            m = gm.get_submodule(at.target) if at.op == "call_module" else None
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or _depthwise(m):
                through.append(at.target)
            elif _dense_conv(m) and at.target != graph.head.layer:
                reader = at.target
            elif graph.kinds.get(at.name) not in _ELEMENTWISE or len(at.all_input_nodes) != 1:
                break
        if reader is not None:
            out = gm.get_submodule(node.target).out_channels
            chains[node.target] = Unit(node.target, "chain", out, reader, 1, tuple(through))
    return chains


def _pointwise(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1) and \
        m.padding in (0, (0, 0)) and m.padding_mode == "zeros"


def _outputs(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _reader(graph, node: torch.fx.Node, linear: bool = False) -> str | None:
    """The one layer ``node``'s output reaches through elementwise nodes, each used once, or None (``linear``:
    a linear layer, reached through the first item of a tuple too)."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        (node,) = users
        if node.op == "call_module":
            m = graph.gm.get_submodule(node.target)
            if isinstance(m, nn.Linear) if linear else _pointwise(m):
                return node.target
        first_item = node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
        if not (first_item and linear) and (graph.kinds.get(node.name) not in _ELEMENTWISE or
                                            len(node.all_input_nodes) != 1):
            return None


def unit_cost(unit: Unit, net: nn.Module) -> int:
    """The parameters one unit costs: its rows of the layers that compute it, its columns of the reader."""
    if unit.kind == "heads":
        attn, reader = net.get_submodule(unit.root), net.get_submodule(unit.reader)
        return 3 * unit.width * (attn.qkv.in_features + (attn.qkv.bias is not None)) + \
            unit.width * reader.out_features
    first, second = net.get_submodule(unit.root), net.get_submodule(unit.reader)
    return math.prod(first.weight.shape[1:]) + (first.bias is not None) + math.prod(second.weight.shape) // \
        second.weight.shape[1]
