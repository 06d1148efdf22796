"""What decomposition needs to know about a network, read off its torch.fx graph.

* Observation points (docs/method.md, "Nodes and observation points"): the output of every ``nn.Conv2d``
  (after its ``nn.BatchNorm2d`` when one directly follows) and of every hidden ``nn.Linear``, outside the
  branches of multiplicative gates; each is the output of one module, so it can be observed and masked with a
  forward hook.
* The head (:class:`Head`): an ``nn.Linear`` classifier, a 1x1 convolution with global average pooling (either
  order: a linear map of the pooled features), or class maps pooled after a nonlinearity (NiN, SqueezeNet).
* Per-sample shapes of every node (shape propagation on one example input); attention layers as one node each.
* The op of every node (:mod:`cnnmod.core.ops`), through which walks between the observation points and the
  head pass regions of nodes (the node kind's MC-BLN and MC-BI: :mod:`cnnmod.node.walks`).

A network outside this vocabulary is refused with a message that names the layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError
from . import ops
from .attention import is_attention
from .layers import check_layer, combines_linear_heads, conv_pads, is_leaf
from .ops import Node


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


class _NamingTracer(torch.fx.Tracer):
    """Remembers the innermost module tracing failed in; attention layers, layers read as what they compute and
    the modules in ``whole`` stay one node each (units.py, :mod:`cnnmod.core.layers`)."""

    def __init__(self, whole: set[str]) -> None:
        super().__init__()
        self.whole, self.failed_in = whole, None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (is_attention(m) or is_leaf(m) or qualified_name in self.whole
                or super().is_leaf_module(m, qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path_of_module(m)
            raise


def trace(net: nn.Module) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """The graph of ``net``, and the modules torch.fx cannot trace into (control flow on traced values), each kept
    whole as one node, with why. Only a failure outside every module is refused."""
    whole: dict[str, str] = {}
    while True:
        tracer = _NamingTracer(set(whole))
        try:
            graph = tracer.trace(net)
            return torch.fx.GraphModule(tracer.root, graph), whole
        except Exception as e:  # noqa: BLE001 - every tracing failure is handled the same way
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if not tracer.failed_in or tracer.failed_in in whole:
                raise UserError(f"torch.fx cannot trace {type(net).__name__}: {first}; cnnmod needs a model whose "
                                "forward has no data-dependent control flow outside its layers")
            whole[tracer.failed_in] = f"torch.fx cannot trace into it ({first[:100]})"


# ------------------------------------------------------------------------------------------------ heads
class Head:
    """The model's classifier read as a linear map of (B, F) features: ``features`` from one forward pass,
    ``weight`` (n, F) and ``bias`` (n,). ``layer`` names the class layer (never an observation point, never
    sliced); ``input`` is the graph node the features are read from. After slicing, every head is an
    ``nn.Linear`` named :attr:`sliced_layer`."""

    kind = "linear"
    reads_input = True  # the features are the class layer's input (ClassMapHead: the network's output)

    def __init__(self, layer: str, input: Node) -> None:
        self.layer, self.input = layer, input

    def features(self, value: torch.Tensor) -> torch.Tensor:
        return value.flatten(1)

    def linear_map(self, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        m = net.get_submodule(self.layer)
        w = m.weight.detach().flatten(1)
        b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], device=w.device)
        return w, b

    def input_region(self, region: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return region.reshape(shape)

    def tag(self, net: nn.Module) -> None:
        """Number the head's input features in its first row (on a copy about to be sliced), so that
        :meth:`kept` reads off which features slicing kept."""
        weight = net.get_submodule(self.layer).weight
        with torch.no_grad():
            weight.view(weight.shape[0], -1)[0].copy_(torch.arange(weight[0].numel(), dtype=weight.dtype))

    def kept(self, net: nn.Module) -> torch.Tensor:
        """The indices of the source's head features that a sliced copy (see :meth:`tag`) still reads."""
        weight = net.get_submodule(self.layer).weight.detach()
        return weight.reshape(weight.shape[0], -1)[0].round().long().cpu()

    @contextmanager
    def capture(self, net: nn.Module) -> Iterator[dict]:
        """Context: ``out["features"]`` holds the (B, F) features of the last forward pass of ``net``."""
        out: dict = {}
        handle = self._hook(net, out)
        try:
            yield out
        finally:
            handle.remove()

    def _hook(self, net: nn.Module, out: dict):
        return net.get_submodule(self.layer).register_forward_pre_hook(
            lambda _m, inputs: out.__setitem__("features", self.features(inputs[0])))

    @property
    def sliced_layer(self) -> str:
        return self.layer

    def replace(self, net: nn.Module, head: nn.Linear) -> nn.Module:
        """``net`` (a copy, changed in place) with its head replaced by ``head``, an ``nn.Linear`` on the features."""
        parent, _, attr = self.layer.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, head)
        return net


class ConvPoolHead(Head):
    """A 1x1 convolution then global average pooling: they commute, so the head is the convolution on the pool."""

    kind = "conv_pool"

    def features(self, value: torch.Tensor) -> torch.Tensor:
        return value.mean((2, 3))

    def input_region(self, region, shape):
        return region.reshape(-1, 1, 1).expand(shape).clone()

    sliced_layer = "head"

    def replace(self, net, head):
        super().replace(net, nn.Identity())  # the network now ends in the pooled features
        return nn.Sequential(OrderedDict(body=net, head=head))


class PooledConvHead(Head):
    """Pooling, then a 1x1 convolution (MobileNetV3's, GhostNet's end): dense on the pool; sliced, flatten + Linear."""

    kind = "pooled_conv"

    @property
    def sliced_layer(self) -> str:
        return f"{self.layer}.1"

    def replace(self, net, head):
        return super().replace(net, nn.Sequential(nn.Flatten(), head))


class ClassMapHead(Head):
    """Class maps pooled after a nonlinearity (NiN, SqueezeNet): the head is not linear in the pooled input, so
    the features are the pooled class maps themselves, and the binary head takes z_c from the concerned map and
    z_uc as the mean of the others' (an identity weight; docs/method.md)."""

    kind = "class_map"
    reads_input = False

    def linear_map(self, net):
        device = next(net.parameters()).device
        n = int(net.get_submodule(self.layer).out_channels)
        return torch.eye(n, device=device), torch.zeros(n, device=device)

    def _hook(self, net, out):
        return net.register_forward_hook(lambda _m, _i, o: out.__setitem__("features", o.flatten(1)))

    sliced_layer = "head"

    def tag(self, net):
        pass  # the class maps are never sliced

    def kept(self, net):
        return torch.arange(int(net.get_submodule(self.layer).out_channels))

    def replace(self, net, head):
        return nn.Sequential(OrderedDict(body=net, head=head))  # the network ends in the pooled class maps


def _pointwise_on_pooled(graph: ModelGraph, node: Node) -> bool:
    """Whether a convolution node is 1x1 (stride 1, no padding, one group) on (C, 1, 1): dense on pooled features."""
    conv = graph.module(node.target)
    src = graph.ops[node.name].inputs(node)
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv_pads(conv) == (0, 0, 0, 0)
            and conv.groups == 1 and bool(src) and graph.shapes.get(src[0].name, ())[1:] == (1, 1))


# ------------------------------------------------------------------------------------------------ the graph
class ModelGraph:
    """The traced network with its observation points, head, gates and node shapes."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.gm, self.untraced = trace(net)  # untraced: the modules kept whole, with why
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        was_training = self.gm.training
        self.gm.eval()
        x = torch.zeros(1, *input_shape, device=device)
        try:
            with torch.no_grad():
                self.gm(x)  # the user's forward, plainly first: its own error, in one line, where it fails
        except Exception as e:  # noqa: BLE001 - the user's forward failed on the stated input
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            self.gm.train(was_training)
            raise UserError(f"{type(net).__name__} fails on a {'x'.join(map(str, input_shape))} input "
                            f"({type(e).__name__}: {first}); check the input size and channels the model expects")
        with torch.no_grad():
            ShapeProp(self.gm).propagate(x)
        self.gm.train(was_training)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.ops = {n.name: ops.op_of(self.gm, n) for n in self.gm.graph.nodes}
        self.kinds = {name: op.kind for name, op in self.ops.items()}
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                self.kinds[n.name] = "input" if n.op == "placeholder" else "output"
        self.shapes = {n.name: tuple(n.meta["tensor_meta"].shape[1:]) for n in self.gm.graph.nodes
                       if hasattr(n.meta.get("tensor_meta"), "shape")}
        self._check_layers()
        for n in self.gm.graph.nodes:
            if n.op == "call_module" and is_leaf(self.module(n.target)):
                check_layer(self.module(n.target), n.target, self.shapes[self.ops[n.name].inputs(n)[0].name])
        self.head = self._find_head()
        self.gates, self.gate_branch = self._find_gates()
        self.points = self._find_points()
        self.point_by_node = {p.node: p for p in self.points}
        self.exact_points = {p.name for p in self.points
                             if getattr(self.ops[p.node], "family", None) == "relu"
                             or self._relu_follows(self.nodes[p.node])}

    # ------------------------------------------------------------------ what the network is
    def describe(self, node: Node) -> str:
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            act = f" with {type(m.act).__name__}" if isinstance(self.ops[node.name], ops.NormAct) else ""
            return f"layer {node.target!r} ({type(m).__name__}{act})"
        return f"{node.op} {getattr(node.target, '__name__', node.target)} (node {node.name})"

    def unsupported(self, node: Node) -> UserError:
        return UserError(f"decomposition cannot follow the model through {self.describe(node)}; supported between "
                         "the layers: ReLU/ReLU6, BatchNorm, residual addition, concatenation, split, pad, "
                         "reshape/flatten/transpose, average and max pooling, mean, dropout, sigmoid gates "
                         "(docs/coverage.md)")

    def _check_layers(self) -> None:
        used: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            kind = self.kinds[n.name]
            if kind == "functional_layer":
                raise UserError(f"the model calls {self.describe(n)} functionally; cnnmod observes nn.Conv2d "
                                "and nn.Linear modules: use modules for its layers")
            if n.op == "call_module" and kind in ("conv", "linear", "bn"):
                used[n.target] = used.get(n.target, 0) + 1
        # a layer called more than once (a convolutional position encoding shared by blocks) is never observed:
        # slim modules keep its channels; node-level decomposition refuses it (require_relu)
        self.shared = {layer for layer, times in used.items() if times > 1}

    def require_relu(self) -> None:
        """Node-level decomposition's conditions (docs/method.md, "Architectures beyond the paper's"): every
        layer used once, hidden activations of the ReLU family, where "inactive" means exactly zero after the
        activation."""
        if self.shared:
            raise UserError(f"layer {sorted(self.shared)[0]!r} is called more than once in the forward pass; "
                            "node-level decomposition needs every convolution and linear layer used once: use slim "
                            "modules for this model (cnnmod decompose «granularity» channel)")
        for n in self.gm.graph.nodes:
            if self.ops[n.name].activation and n.name not in self.gate_branch:
                raise UserError(f"the model uses {self.describe(n)}; the paper's node rule needs ReLU-family hidden "
                                "activations (active means > 0): use slim modules for this model "
                                "(cnnmod decompose «granularity» channel)")

    def _skip_back(self, node, kinds: tuple[str, ...]):
        while isinstance(node, Node) and self.kinds[node.name] in kinds:
            node = self.ops[node.name].inputs(node)[0] if self.ops[node.name].inputs(node) else None
        return node

    def _find_head(self) -> Head:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, Node):
            raise UserError(f"the model returns {type(result).__name__}, not one tensor of logits; "
                            "return the classifier's output (N, classes)")
        if len(self.shapes.get(result.name, ())) != 1:
            shape = self.shapes.get(result.name)
            raise UserError(f"the model's output is (N, {', '.join(map(str, shape or ('?',)))}), not (N, classes); "
                            "return the logits as one (N, classes) tensor")
        end = self._skip_back(result, ("reshape", "identity"))
        if not isinstance(end, Node):
            raise UserError("the model's output does not come from a layer")
        kind = self.kinds[end.name]
        if kind == "linear":
            src = self.ops[end.name].inputs(end)[0]
            return Head(end.target, src)
        if kind == "conv" and _pointwise_on_pooled(self, end):
            return PooledConvHead(end.target, self.ops[end.name].inputs(end)[0])
        if kind in ("pool", "reduce") and self._global_pool(end):
            inner = self.ops[end.name].inputs(end)[0]
            before = self._skip_back(inner, ("identity",))
            if isinstance(before, Node) and self.kinds[before.name] == "conv" and self._averages(end):
                conv = self.module(before.target)
                if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv_pads(conv) == (0, 0, 0, 0):
                    return ConvPoolHead(before.target, self.ops[before.name].inputs(before)[0])
            conv_node = self._skip_back(inner, ("relu", "bn", "identity"))
            if isinstance(conv_node, Node) and self.kinds[conv_node.name] == "conv":
                return ClassMapHead(conv_node.target, result)
        if combines_linear_heads(self.gm, result):
            raise UserError("the model's output combines several linear heads (a distillation token's, one per "
                            "stage): node-level modules read one classifier; slim modules read them as one where "
                            "the output is a weighted sum of them (cnnmod decompose «granularity» channel)")
        raise UserError(f"the model's output comes from {self.describe(end)}, not from a classifier cnnmod knows; "
                        "end the model in nn.Linear, or in a 1x1 convolution with global average pooling, and "
                        "return its logits")

    def _averages(self, node: Node) -> bool:
        """Whether a pooling node averages (rather than takes a maximum or a sum)."""
        if node.op == "call_module":
            return isinstance(self.module(node.target), (nn.AvgPool2d, nn.AdaptiveAvgPool2d))
        return node.target in (ops.F.avg_pool2d, ops.F.adaptive_avg_pool2d, torch.mean, "mean")

    def _global_pool(self, node: Node) -> bool:
        shape = self.shapes.get(node.name, ())
        src = self.ops[node.name].inputs(node)
        return bool(src) and len(self.shapes.get(src[0].name, ())) == 3 and math.prod(shape) == \
            self.shapes[src[0].name][0]

    def _find_gates(self) -> tuple[set[str], set[str]]:
        """Gate operands of products (sigmoid-like values) and the branches computing them (every use into a gate)."""
        gates: set[str] = set()
        for n in self.gm.graph.nodes:
            if self.kinds[n.name] != "multiply":
                continue
            for a in self.ops[n.name].inputs(n):
                src = self._skip_back(a, ("reshape", "identity", "expand", "add", "multiply"))
                if isinstance(src, Node) and self.kinds[src.name] == "gate" and len(self.ops[n.name].inputs(n)) == 2:
                    gates.add(a.name)
        branch: set[str] = set()
        work = [self.nodes[g] for g in gates]
        while work:
            node = work.pop()
            if node.name in branch:
                continue
            branch.add(node.name)
            for src in node.all_input_nodes:
                if src.op != "placeholder" and all(u.name in branch or u.name in gates for u in src.users):
                    work.append(src)
        # a node feeding the gate and something else (the gated input itself) stays outside the branch
        return gates, branch

    def _relu_follows(self, node: Node) -> bool:
        """Whether every use of ``node`` meets a ReLU before anything else (dropout, identity and reshapes
        aside): there a switched-off node is exactly what an inactive one is, 0 after the ReLU (docs/method.md,
        "Architectures beyond the paper's"); elsewhere (an addition or a BatchNorm first) forcing it to 0
        changes what follows."""
        users = list(node.users)
        return bool(users) and all(
            self.kinds[u.name] == "relu" or (self.kinds[u.name] in ("identity", "reshape") and self._relu_follows(u))
            for u in users)

    def _find_points(self) -> list[ObservationPoint]:
        points = []
        head_layer = self.head.layer
        for n in self.gm.graph.nodes:
            kind = self.kinds[n.name]
            if n.name in self.gate_branch or n.op != "call_module" or n.target == head_layer or \
                    n.target in self.shared:
                continue
            if kind == "conv":
                users = list(n.users)
                if len(users) == 1 and self.kinds[users[0].name] == "bn":
                    points.append(ObservationPoint(users[0].target, n.target, "conv", users[0].name,
                                                   self.shapes[users[0].name]))
                else:
                    points.append(ObservationPoint(n.target, n.target, "conv", n.name, self.shapes[n.name]))
            elif kind == "linear":
                points.append(ObservationPoint(n.target, n.target, "linear", n.name, self.shapes[n.name]))
        if not points:
            raise UserError("the model has no convolution or hidden linear layer to decompose")
        return points

    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(name)

    @property
    def classifier(self) -> str:
        """The class layer's name (an ``nn.Linear``, or the class convolution)."""
        return self.head.layer

    @property
    def head_features(self) -> int:
        return int(self.head.linear_map(self.gm)[0].shape[1])

    def head_region(self, region: torch.Tensor) -> tuple[Node, torch.Tensor]:
        """The node the head reads and ``region`` (over the head's features) as a region of that node."""
        node = self.head.input
        return node, self.head.input_region(region, self.shapes[node.name])
