"""The ops decomposition walks through: one entry per kind of graph node, as Torch-Pruning keys its pruning
functions by layer type.

Each :class:`Op` says which of a node's arguments are the tensors it reads (:meth:`Op.inputs`) and, for a
region of its output (a boolean tensor of the node's per-sample shape), which elements of each input that
region reads (:meth:`Op.reads`). MC-BLN's backtracking (marks from the head back to the observation points)
and MC-BI's liveness (which nodes still reach the head) are both walks over :meth:`Op.reads`
(:class:`cnnmod.core.graph.ModelGraph`); a new kind of layer is one entry in the tables at the end of this file.

Regions are per sample: the batch dimension is never part of them, and an op that mixes samples (a reshape
across the batch, a split along it) is refused.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import activation_family, conv_pads, is_norm_act

if TYPE_CHECKING:
    from .graph import ModelGraph

Node = torch.fx.Node
Reads = list[tuple[Node, torch.Tensor]]


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def transpose_cover(region: torch.Tensor, ones: torch.Tensor, stride, padding, dilation, groups: int,
                    size: tuple[int, int]) -> torch.Tensor:
    """For each input element of a sliding-window layer, how many (kept output, kernel tap) pairs read it.

    A transposed convolution with a kernel of ones, without padding; the left padding is cut off, and the right
    end is cropped or zero-padded to the input's size (ceil-mode windows overhang the input there; floor mode
    can leave rows that no window reads, and its right padding may be partly unused).
    """
    if isinstance(padding, str):
        raise UserError(f"convolutions with padding={padding!r} are not supported by MC-BI; give padding as numbers")
    out = F.conv_transpose2d(region.float().unsqueeze(0), ones, stride=stride, dilation=dilation, groups=groups)[0]
    (h, w), (ph, pw) = size, pair(padding)
    out = out[:, ph:ph + h, pw:pw + w]
    return F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))


def unbroadcast(region: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The elements of an operand of ``shape`` (broadcast to the region's shape) that the region reads."""
    extra = region.dim() - len(shape)
    r = region.any(0) if extra > 0 and region.dim() > 0 else region
    for _ in range(extra - 1):
        r = r.any(0)
    for d, size in enumerate(shape):
        if size == 1 and r.shape[d] != 1:
            r = r.any(d, keepdim=True)
    return r.reshape(shape)


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _sample_dim(dim: int, ndim: int) -> int:
    """A batched tensor's dimension as a per-sample one (``ndim`` counts the batch); the batch itself is None."""
    d = dim + ndim if dim < 0 else dim
    return d - 1


class Op:
    """How one kind of node passes regions back to its inputs. ``kind`` names it in messages and checks."""

    kind = "other"
    activation = False  # a hidden activation: the paper's node rule holds only for the ReLU family

    def __init__(self, kind: str | None = None) -> None:
        if kind is not None:
            self.kind = kind

    def inputs(self, node: Node) -> list[Node]:
        """The tensors the op reads (the first argument, for most)."""
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, Node) else []

    def reads(self, g: ModelGraph, node: Node, region: torch.Tensor) -> Reads:
        raise g.unsupported(node)


class Same(Op):
    """Element for element: ReLU, BatchNorm, dropout, identity, a gate's sigmoid (allowed only in a gate
    branch)."""

    def reads(self, g, node, region):
        return [(src, unbroadcast(region, g.shapes[src.name])) for src in self.inputs(node)]


class NormAct(Same):
    """A norm + activation layer (:mod:`cnnmod.core.layers`): a BatchNorm, then its activation, element for
    element; ``family`` is the activation's (:func:`~cnnmod.core.layers.activation_family`)."""

    kind = "bn"

    def __init__(self, family: str) -> None:
        self.family = family
        self.activation = family == "other"


class Elementwise(Same):
    """Addition and subtraction of tensors (residual shortcuts): every operand, broadcast back."""

    def inputs(self, node):
        return [a for a in node.args[:2] if isinstance(a, Node)]


class Multiply(Elementwise):
    """``x * gate`` (squeeze-and-excitation, attention) passes through to ``x`` only; the gate branch holds no
    observation points (docs/method.md, "Architectures beyond the paper's"). ``x * constant`` is element for
    element. Two feature maps multiplied together are refused."""

    kind = "multiply"

    def reads(self, g, node, region):
        tensors = self.inputs(node)
        if len(tensors) == 2:
            kept = [t for t in tensors if t.name not in g.gates]
            if len(kept) != 1:
                raise UserError(f"the model multiplies two feature maps at {g.describe(node)}; cnnmod follows a "
                                "product only where one factor is a sigmoid gate (squeeze-and-excitation, "
                                "attention)")
            tensors = kept
        return [(src, unbroadcast(region, g.shapes[src.name])) for src in tensors]


class Activation(Op):
    """A hidden activation that is not zero below zero (SiLU, GELU, Hardswish, ...): the paper's rule does not
    apply; refused by node-level decomposition when it lies on the path to the head."""

    kind = "other_activation"
    activation = True


class Conv(Op):
    """MC-BI: an input node is read when it feeds a kept output node (padding excluded), one transposed
    convolution with a kernel of ones (docs/method.md, "MC-BI")."""

    kind = "conv"

    def reads(self, g, node, region):
        conv: nn.Conv2d = g.module(node.target)
        (src,) = self.inputs(node)
        c_in, h, w = g.shapes[src.name]
        ones = torch.ones(conv.out_channels, c_in // conv.groups, *conv.kernel_size)
        left, right, top, bottom = conv_pads(conv)
        if left != right or top != bottom:
            raise UserError(f"MC-BI cannot follow the model through {g.describe(node)}: it pads its input by more "
                            "on one side than the other; use mc or mc-bln")
        cover = transpose_cover(region, ones, conv.stride, (top, left), conv.dilation, conv.groups, (h, w))
        return [(src, cover > 0)]


class Linear(Op):
    """A hidden dense layer with any kept output reads all its inputs."""

    kind = "linear"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        return [(src, torch.full(g.shapes[src.name], bool(region.any())))]


class Reshape(Op):
    """Flatten, view, reshape: the same elements in the same order, per sample."""

    kind = "reshape"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        shape = g.shapes[src.name]
        if math.prod(shape) != region.numel():
            raise UserError(f"{g.describe(node)} reshapes across the batch dimension; cnnmod needs every reshape "
                            "to keep the batch first (e.g. x.view(x.size(0), -1))")
        return [(src, region.reshape(shape))]


class Transpose(Op):
    """``transpose`` and ``permute`` (channel shuffle): the inverse permutation of the region."""

    kind = "transpose"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        ndim = len(g.shapes[src.name]) + 1
        if node.target == "permute" or node.target is torch.permute:
            dims = node.args[1:] if node.target == "permute" else node.args[1]
            dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
            dims = [d + ndim if d < 0 else d for d in dims]
            if dims[0] != 0:
                raise g.unsupported(node)
            per = [d - 1 for d in dims[1:]]
            inverse = [per.index(i) for i in range(len(per))]
            return [(src, region.permute(*inverse))]
        a, b = (_sample_dim(int(d), ndim) for d in node.args[1:3])
        if a < 0 or b < 0:
            raise g.unsupported(node)
        return [(src, region.transpose(a, b))]


class Concat(Op):
    """``torch.cat`` (DenseNet, Inception, fire modules): each input reads its slice of the region, at its
    offset (docs/method.md)."""

    kind = "concat"

    def inputs(self, node):
        return [t for t in node.args[0] if isinstance(t, Node)]

    def reads(self, g, node, region):
        tensors = list(node.args[0])
        if not all(isinstance(t, Node) for t in tensors):
            raise g.unsupported(node)
        dim = _sample_dim(int(_arg(node, 1, "dim", 0)), len(g.shapes[node.name]) + 1)
        if dim < 0:
            raise g.unsupported(node)
        sizes = [g.shapes[t.name][dim] for t in tensors]
        return list(zip(tensors, region.split(sizes, dim), strict=True))


class Split(Op):
    """``split`` and ``chunk``: read only through the ``getitem`` that picks a piece (:class:`GetItem`)."""

    kind = "split"


def is_split(node) -> bool:
    """Whether ``node`` is a ``split``/``chunk`` (its pieces are picked by ``getitem``)."""
    return isinstance(node, Node) and (
        (node.op == "call_function" and node.target in (torch.split, torch.chunk)) or
        (node.op == "call_method" and node.target in ("split", "chunk")))


class GetItem(Op):
    """Indexing: a piece of a split (its offset into the split input), or basic slicing of a tensor with the
    batch dimension kept whole."""

    kind = "getitem"

    def inputs(self, node):
        src = node.args[0]
        if is_split(src):
            return [s for s in src.args[:1] if isinstance(s, Node)]
        return [src] if isinstance(src, Node) else []

    def reads(self, g, node, region):
        src, index = node.args[0], node.args[1]
        if is_split(src):
            base = src.args[0]
            ndim = len(g.shapes[base.name]) + 1
            dim = _sample_dim(int(_arg(src, 2, "dim", 0)), ndim)
            if dim < 0:
                raise g.unsupported(src)
            pieces = [m.shape[dim + 1] for m in src.meta["tensor_meta"]]
            full = torch.zeros(g.shapes[base.name], dtype=torch.bool)
            offset = sum(pieces[:index])
            full.narrow(dim, offset, pieces[index]).copy_(region)
            return [(base, full)]
        if src.name not in g.shapes:
            raise g.unsupported(node)
        index = index if isinstance(index, tuple) else (index,)
        if not index or index[0] != slice(None) or any(isinstance(i, Node) for i in index):
            raise g.unsupported(node)
        full = torch.zeros((1, *g.shapes[src.name]), dtype=torch.bool)
        full[index] = region.unsqueeze(0)
        return [(src, full[0])]


class Pad(Op):
    """``F.pad`` with zeros (PyramidNet's zero-padded shortcuts): padded positions and channels are constants,
    never nodes; the input reads the region cropped back."""

    kind = "pad"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        pads = list(_arg(node, 1, "pad"))
        mode = _arg(node, 2, "mode", "constant")
        if mode != "constant" or len(pads) // 2 > region.dim():
            raise g.unsupported(node)
        cropped = F.pad(region.float().unsqueeze(0), [-p for p in pads])[0] > 0
        return [(src, cropped)]


class Pool(Op):
    """Average and max pooling (as layers or functions): an input element is read when a read window covers
    it (global pooling: the whole channel plane)."""

    kind = "pool"

    def __init__(self, adaptive: bool) -> None:
        self.adaptive = adaptive

    def params(self, g, node) -> dict:
        if node.op == "call_module":
            m = g.module(node.target)
            if self.adaptive:
                return {"output_size": m.output_size}
            return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                    "dilation": getattr(m, "dilation", 1)}
        if self.adaptive:
            return {"output_size": _arg(node, 1, "output_size")}
        kernel = _arg(node, 1, "kernel_size")
        return {"kernel_size": kernel, "stride": _arg(node, 2, "stride", None) or kernel,
                "padding": _arg(node, 3, "padding", 0),
                "dilation": _arg(node, 4, "dilation", 1) if node.target is not F.avg_pool2d else 1}

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        c, h, w = g.shapes[src.name]
        p = self.params(g, node)
        if self.adaptive:
            oh, ow = region.shape[-2:]
            cover = torch.zeros(c, h, w, dtype=torch.bool)
            for i in range(oh):
                h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
                for j in range(ow):
                    w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
                    cover[:, h0:h1, w0:w1] |= region[:, i:i + 1, j:j + 1]
            return [(src, cover)]
        k, s = pair(p["kernel_size"]), pair(p["stride"] or p["kernel_size"])
        cover = transpose_cover(region, torch.ones(c, 1, *k), s, pair(p["padding"]), pair(p["dilation"]), c, (h, w))
        return [(src, cover > 0)]


class Reduce(Op):
    """``mean``, ``sum`` and ``amax`` over some dimensions (``x.mean((2, 3))``: global average pooling)."""

    kind = "reduce"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        shape = g.shapes[src.name]
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            return [(src, torch.full(shape, bool(region.any())))]
        dims = [dims] if isinstance(dims, int) else list(dims)
        per = sorted(_sample_dim(int(d), len(shape) + 1) for d in dims)
        if any(d < 0 for d in per):
            raise g.unsupported(node)
        r = region
        if not _arg(node, 2, "keepdim", False):
            for d in per:
                r = r.unsqueeze(d)
        return [(src, r.expand(shape).clone())]


class Expand(Op):
    """``expand``/``expand_as``: the operand's elements each read where any copy of them is read."""

    kind = "expand"

    def reads(self, g, node, region):
        (src,) = self.inputs(node)
        return [(src, unbroadcast(region, g.shapes[src.name]))]


class NoTensor(Op):
    """``size()``, ``shape``, ``dim()`` (numbers about a tensor, not values of it) and constants: they read no
    node."""

    kind = "meta"

    def reads(self, g, node, region):
        return []


# ---------------------------------------------------------------------------------------------- the tables
_SAME, _RELU = Same("identity"), Same("relu")
_ACTIVATION, _GATE = Activation(), Same("gate")
_POOL, _ADAPTIVE = Pool(adaptive=False), Pool(adaptive=True)

MODULE_OPS: dict[type, Op] = {
    nn.Conv2d: Conv(), nn.Linear: Linear(), nn.BatchNorm2d: Same("bn"), nn.BatchNorm1d: Same("bn"),
    nn.ReLU: _RELU, nn.ReLU6: _RELU, nn.Flatten: Reshape(), nn.Identity: _SAME, nn.Dropout: _SAME,
    nn.Dropout2d: _SAME, nn.AvgPool2d: _POOL, nn.MaxPool2d: _POOL, nn.AdaptiveAvgPool2d: _ADAPTIVE,
    nn.AdaptiveMaxPool2d: _ADAPTIVE, nn.Sigmoid: _GATE, nn.Hardsigmoid: _GATE,
    **{cls: _ACTIVATION for cls in (nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.Hardswish,
                                    nn.Mish, nn.PReLU, nn.SELU, nn.CELU, nn.Softmax)},
}
FUNCTION_OPS: dict[object, Op] = {
    F.relu: _RELU, torch.relu: _RELU, torch.relu_: _RELU, F.relu6: _RELU, F.dropout: _SAME,
    operator.add: Elementwise("add"), operator.iadd: Elementwise("add"), torch.add: Elementwise("add"),
    operator.sub: Elementwise("add"), torch.sub: Elementwise("add"),
    operator.mul: Multiply(), operator.imul: Multiply(), torch.mul: Multiply(), operator.truediv: Multiply(),
    torch.flatten: Reshape(), torch.reshape: Reshape(), torch.transpose: Transpose(), torch.permute: Transpose(),
    torch.cat: Concat(), torch.concat: Concat(), torch.concatenate: Concat(),
    torch.split: Split(), torch.chunk: Split(), operator.getitem: GetItem(), F.pad: Pad(),
    F.avg_pool2d: _POOL, F.max_pool2d: _POOL, F.adaptive_avg_pool2d: _ADAPTIVE, F.adaptive_max_pool2d: _ADAPTIVE,
    torch.mean: Reduce(), torch.sum: Reduce(), torch.amax: Reduce(),
    torch.sigmoid: _GATE, F.sigmoid: _GATE, F.hardsigmoid: _GATE, getattr: NoTensor(),
    **{f: _ACTIVATION for f in (F.gelu, F.silu, F.elu, F.leaky_relu, torch.tanh, F.softplus, F.hardswish, F.mish,
                                F.selu)},
}
METHOD_OPS: dict[str, Op] = {
    "relu": _RELU, "relu_": _RELU, "add": Elementwise("add"), "add_": Elementwise("add"),
    "mul": Multiply(), "mul_": Multiply(), "view": Reshape(), "reshape": Reshape(), "flatten": Reshape(),
    "contiguous": _SAME, "clone": _SAME, "transpose": Transpose(), "permute": Transpose(), "split": Split(),
    "chunk": Split(), "mean": Reduce(), "sum": Reduce(), "amax": Reduce(), "expand": Expand(),
    "expand_as": Expand(), "size": NoTensor(), "dim": NoTensor(), "sigmoid": _GATE, "tanh": _ACTIVATION,
}
_FUNCTIONAL_LAYERS = {F.conv2d, F.linear, F.batch_norm}
_OTHER, _FUNCTIONAL, _CONSTANT = Op(), Op("functional_layer"), NoTensor("constant")


def _module_op(m: nn.Module) -> Op:
    if is_norm_act(m):
        return NormAct(activation_family(m.act))
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return _RELU if m.min_val == 0 else _ACTIVATION
    for cls in type(m).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    return _OTHER


def op_of(gm: torch.fx.GraphModule, node: Node) -> Op:
    """The table entry of a node (an :class:`Op` that refuses every walk when the node is none of the above)."""
    if node.op == "call_module":
        return _module_op(gm.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in _FUNCTIONAL_LAYERS:
            return _FUNCTIONAL
        try:
            return FUNCTION_OPS.get(node.target, _OTHER)
        except TypeError:  # an unhashable target
            return _OTHER
    if node.op == "call_method":
        return METHOD_OPS.get(node.target, _OTHER)
    if node.op == "get_attr":
        return _CONSTANT
    return _OTHER
