"""What decomposition needs to know about a network, read off its torch.fx graph.

* Observation points (docs/method.md, "Nodes and observation points"): the output of every ``nn.Conv2d``
  (after its ``nn.BatchNorm2d`` when one directly follows) and of every hidden ``nn.Linear``; each is the
  output of one module, so it can be observed and masked with a forward hook.
* The classifier: the ``nn.Linear`` whose output is the network's output, and the node feeding it.
* Per-sample shapes of every node (shape propagation on one example input).
* Two walks over the graph between the observation points and the classifier: marking nodes backwards
  from the head (MC-BLN), and liveness of nodes given the masks (MC-BI).

A network outside this vocabulary is refused with a message that names the layer.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError

_RELU = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN = {torch.flatten}
_OTHER_ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.Hardswish,
                      nn.Mish, nn.PReLU, nn.SELU, nn.CELU, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Softmax)
_OTHER_ACTIVATION_FUNCTIONS = {F.gelu, F.silu, F.elu, F.leaky_relu, torch.sigmoid, torch.tanh, F.softplus,
                               F.hardswish, F.mish, F.selu, F.relu6, F.hardtanh}


@dataclass(frozen=True)
class ObservationPoint:
    name: str   # qualified name of the module whose output is observed (a BatchNorm after a conv, or the layer)
    layer: str  # the Conv2d or Linear it belongs to
    kind: str   # "conv" or "linear"
    node: str   # fx node name
    shape: tuple[int, ...]  # per-sample shape

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _transpose_cover(region: torch.Tensor, ones: torch.Tensor, stride, padding, dilation, groups: int,
                     size: tuple[int, int]) -> torch.Tensor:
    """For each input element of a sliding-window layer, how many (kept output, kernel tap) pairs read it.

    A transposed convolution with a kernel of ones, without padding; the left padding is cut off, and the right
    end is cropped or zero-padded to the input's size (ceil-mode windows overhang the input there; floor mode
    can leave rows that no window reads, and its right padding may be partly unused).
    """
    if isinstance(padding, str):
        raise UserError(f"convolutions with padding={padding!r} are not supported by MC-BI; give padding as numbers")
    out = F.conv_transpose2d(region.float().unsqueeze(0), ones, stride=stride, dilation=dilation, groups=groups)[0]
    # index t of the unpadded result is input index t - padding; the right end may overhang or fall short
    (h, w), (ph, pw) = size, _pair(padding)
    out = out[:, ph:ph + h, pw:pw + w]
    return F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))


class _NamingTracer(torch.fx.Tracer):
    """A tracer that remembers which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def trace(net: nn.Module) -> torch.fx.GraphModule:
    tracer = _NamingTracer()
    try:
        graph = tracer.trace(net)
    except Exception as e:  # noqa: BLE001 - every tracing failure is reported the same way
        where = f" in layer {tracer.stack[-1]!r}" if tracer.stack and tracer.stack[-1] else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"torch.fx cannot trace {type(net).__name__}{where}: {first[:160]}; cnnmod needs a model "
                        "whose forward has no data-dependent control flow")
    return torch.fx.GraphModule(tracer.root, graph)


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """A small vocabulary of what a node does."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for cls, kind in ((nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"),
                          (nn.Flatten, "flatten"), (nn.Identity, "identity"), (nn.Dropout, "identity"),
                          (nn.Dropout2d, "identity"), (nn.AvgPool2d, "pool"), (nn.MaxPool2d, "pool"),
                          (nn.AdaptiveAvgPool2d, "adaptive_pool"), (nn.AdaptiveMaxPool2d, "adaptive_pool")):
            if isinstance(m, cls):
                return kind
        if isinstance(m, _OTHER_ACTIVATIONS):
            return "other_activation"
        return "other"
    if node.op == "call_function":
        if node.target in _RELU:
            return "relu"
        if node.target in _ADD:
            return "add"
        if node.target in _FLATTEN:
            return "flatten"
        if node.target in (F.dropout,):
            return "identity"
        if node.target in (F.conv2d, F.linear):
            return "functional_layer"
        if node.target in _OTHER_ACTIVATION_FUNCTIONS:
            return "other_activation"
        return "other"
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("add", "add_"):
            return "add"
        if node.target in ("view", "reshape", "flatten"):
            return "flatten"
        if node.target in ("contiguous",):
            return "identity"
        if node.target in ("sigmoid", "tanh"):
            return "other_activation"
        return "other"
    return "other"


def _describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    return f"{node.op} {getattr(node.target, '__name__', node.target)} (node {node.name})"


class ModelGraph:
    """The traced network with its observation points, classifier and node shapes."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.gm = trace(net)
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        was_training = self.gm.training
        self.gm.eval()
        with torch.no_grad():
            ShapeProp(self.gm).propagate(torch.zeros(1, *input_shape, device=device))
        self.gm.train(was_training)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.kinds = {n.name: _kind(self.gm, n) for n in self.gm.graph.nodes}
        self.shapes = {n.name: tuple(n.meta["tensor_meta"].shape[1:]) for n in self.gm.graph.nodes
                       if hasattr(n.meta.get("tensor_meta"), "shape")}
        self._check()
        self.points = self._find_points()
        self.point_by_node = {p.node: p for p in self.points}

    def _check(self) -> None:
        used: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            kind = self.kinds[n.name]
            if kind == "other_activation":
                raise UserError(f"the model uses {_describe(self.gm, n)}; decomposition needs ReLU hidden layers "
                                "(docs/method.md, \"Nodes and observation points\")")
            if kind == "functional_layer":
                raise UserError(f"the model calls {_describe(self.gm, n)} functionally; cnnmod observes nn.Conv2d "
                                "and nn.Linear modules: use modules for its layers")
            if n.op == "call_module" and kind in ("conv", "linear", "bn"):
                used[n.target] = used.get(n.target, 0) + 1
                if used[n.target] > 1:
                    raise UserError(f"layer {n.target!r} is called twice in the forward pass; cnnmod needs every "
                                    "convolution and linear layer used once")
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, torch.fx.Node) or self.kinds[result.name] != "linear":
            what = _describe(self.gm, result) if isinstance(result, torch.fx.Node) else repr(result)[:60]
            raise UserError(f"the model's output comes from {what}, not from a Linear classifier layer; "
                            "decomposition needs a classifier that ends in nn.Linear (return its logits)")
        self.classifier_node = result
        self.classifier = result.target
        head_in = result.args[0]
        if not isinstance(head_in, torch.fx.Node):
            raise UserError("the classifier's input is not a tensor of the graph")
        self.head_input = head_in

    def _find_points(self) -> list[ObservationPoint]:
        points = []
        for n in self.gm.graph.nodes:
            kind = self.kinds[n.name]
            if kind == "conv":
                users = list(n.users)
                if len(users) == 1 and self.kinds[users[0].name] == "bn":
                    points.append(ObservationPoint(users[0].target, n.target, "conv", users[0].name,
                                                   self.shapes[users[0].name]))
                else:
                    points.append(ObservationPoint(n.target, n.target, "conv", n.name, self.shapes[n.name]))
            elif kind == "linear" and n is not self.classifier_node:
                points.append(ObservationPoint(n.target, n.target, "linear", n.name, self.shapes[n.name]))
        if not points:
            raise UserError("the model has no convolution or hidden linear layer to decompose")
        return points

    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(name)

    @property
    def head_features(self) -> int:
        return int(self.module(self.classifier).in_features)

    # ------------------------------------------------------------------ walks
    def _inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.args if isinstance(a, torch.fx.Node)]

    def _unsupported(self, node: torch.fx.Node, what: str) -> UserError:
        return UserError(f"{what} cannot pass through {_describe(self.gm, node)}; supported between the layers: "
                         "ReLU, residual addition, flatten, average and max pooling, dropout")

    def _pool_cover(self, node: torch.fx.Node, region: torch.Tensor) -> torch.Tensor:
        """Input elements of a pooling node that lie in the window of at least one ``region`` output element."""
        c, h, w = self.shapes[self._inputs(node)[0].name]
        if self.kinds[node.name] == "adaptive_pool":
            oh, ow = region.shape[-2:]
            cover = torch.zeros(c, h, w, dtype=torch.bool)
            for i in range(oh):
                h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
                for j in range(ow):
                    w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
                    cover[:, h0:h1, w0:w1] |= region[:, i:i + 1, j:j + 1]
            return cover
        m = self.module(node.target)
        k = _pair(m.kernel_size)
        s = _pair(m.stride or m.kernel_size)
        d = _pair(getattr(m, "dilation", 1))
        return _transpose_cover(region, torch.ones(c, 1, *k), s, _pair(m.padding), d, c, (h, w)) > 0

    def _conv_needs(self, node: torch.fx.Node, kept_out: torch.Tensor) -> torch.Tensor:
        """Input nodes of a convolution that feed at least one kept output node (padding excluded)."""
        conv: nn.Conv2d = self.module(node.target)
        c_in, h, w = self.shapes[self._inputs(node)[0].name]
        ones = torch.ones(conv.out_channels, c_in // conv.groups, *conv.kernel_size)
        return _transpose_cover(kept_out, ones, conv.stride, conv.padding, conv.dilation, conv.groups, (h, w)) > 0

    def mark_back(self, region: torch.Tensor, delta: float) -> dict[str, torch.Tensor]:
        """MC-BLN: map marked head-input features back to the observation-point nodes they summarise.

        Returns, per observation point that was reached, the boolean nodes to switch off. Hidden dense layers
        are walked through first: a node of the layer below is marked when at least one node above is marked
        and its weights into the marked nodes are all <= -delta.
        """
        off: dict[str, torch.Tensor] = {}
        work = [(self.head_input, region.reshape(self.shapes[self.head_input.name]))]
        while work:
            node, reg = work.pop()
            if not bool(reg.any()):
                continue
            kind = self.kinds[node.name]
            point = self.point_by_node.get(node.name)
            if point is not None:
                off[point.name] = off.get(point.name, torch.zeros(point.shape, dtype=torch.bool)) | reg
                if point.kind == "linear":
                    weight = self.module(point.layer).weight.detach().cpu()
                    into_marked = weight[reg.reshape(-1)]
                    below = (into_marked <= -delta).all(dim=0)
                    lin_node = self.nodes[point.node]
                    work.append((self._inputs(lin_node)[0], below.reshape(self.shapes[self._inputs(lin_node)[0].name])))
                continue
            if kind == "input":
                continue  # marks that reach the image itself switch nothing off
            if kind in ("relu", "identity"):
                work.append((self._inputs(node)[0], reg))
            elif kind == "flatten":
                src = self._inputs(node)[0]
                work.append((src, reg.reshape(self.shapes[src.name])))
            elif kind == "add":
                for src in self._inputs(node):
                    work.append((src, reg))
            elif kind in ("pool", "adaptive_pool"):
                work.append((self._inputs(node)[0], self._pool_cover(node, reg)))
            else:
                raise self._unsupported(node, "MC-BLN's backtracking")
        return off

    def needed(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MC-BI: for every observation point, the nodes whose value reaches the classifier given ``masks``.

        Liveness in reverse topological order: a node is needed when some consumer needs it; a convolution needs
        an input node when it feeds at least one kept output node; pooling needs an input node when at least
        one window covering it is needed; a dense layer with any kept output needs all its inputs.
        """
        need: dict[str, torch.Tensor] = {}
        nodes = list(self.gm.graph.nodes)
        head_in = self.head_input.name
        for node in reversed(nodes):
            if node.op in ("output", "placeholder") or node is self.classifier_node or node.name not in self.shapes:
                continue
            shape = self.shapes[node.name]
            if node.name == head_in:
                need[node.name] = torch.ones(shape, dtype=torch.bool)
                continue
            acc = torch.zeros(shape, dtype=torch.bool)
            for user in node.users:
                if user is self.classifier_node:
                    acc.fill_(True)
                    continue
                if user.name not in need:
                    continue  # a consumer that does not lead to the classifier
                eff = need[user.name]
                point = self.point_by_node.get(user.name)
                if point is not None:
                    eff = eff & masks[point.name]
                kind = self.kinds[user.name]
                if kind == "conv":
                    acc |= self._conv_needs(user, eff)
                elif kind == "linear":
                    if bool(eff.any()):
                        acc.fill_(True)
                elif kind in ("bn", "relu", "identity", "add"):
                    acc |= eff
                elif kind == "flatten":
                    acc |= eff.reshape(shape)
                elif kind in ("pool", "adaptive_pool"):
                    acc |= self._pool_cover(user, eff)
                else:
                    raise self._unsupported(user, "MC-BI's backtracking")
            need[node.name] = acc
        return {p.name: need.get(p.node, torch.zeros(p.shape, dtype=torch.bool)) for p in self.points}
