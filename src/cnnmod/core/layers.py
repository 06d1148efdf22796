"""Layers that subclass a layer cnnmod knows, read as what they compute without tracing into their forward
(docs/coverage.md, "Layers read as what they compute").

A **convolution or dense layer with its own forward** (timm's ``Linear``, which calls ``F.linear`` itself) is read as
the layer it subclasses. A **norm + activation layer** (timm's ``BatchNormAct2d`` and its kin: an ``nn.BatchNorm2d``
subclass whose forward calls ``F.batch_norm`` and then its ``drop`` and ``act`` children) is read as a BatchNorm
followed by its activation, and the activation by what it does (:func:`activation_family`): the ReLU family (0 at
and below 0, positive above), another elementwise activation, or none. Either is one graph node, checked once on
the input it reads in the network to compute exactly what it is read as (:func:`check_layer`). A convolution's
padding, ``"same"`` included, is read as PyTorch pads (:func:`conv_pads`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

_KNOWN = (nn.Conv2d, nn.Linear)


def _outside_torch(m: nn.Module) -> bool:
    return not type(m).__module__.startswith("torch.")


def _base(m: nn.Module) -> type | None:
    return next((b for b in _KNOWN if isinstance(m, b)), None)


def is_read_as_base(m: nn.Module) -> bool:
    """Whether ``m`` subclasses ``nn.Conv2d`` or ``nn.Linear`` from outside torch with a forward of its own."""
    base = _base(m)
    return base is not None and _outside_torch(m) and type(m).forward is not base.forward


def is_leaf(m: nn.Module) -> bool:
    """Whether the graph keeps ``m`` one node, read as what it computes (checked by :func:`check_layer`)."""
    return is_norm_act(m) or is_read_as_base(m)


def is_norm_act(m: nn.Module) -> bool:
    """Whether ``m`` is a BatchNorm subclass from outside torch that applies an ``act`` child after normalising."""
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and _outside_torch(m)
            and isinstance(getattr(m, "act", None), nn.Module))


def conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The zeros a convolution pads its input with: (left, right, top, bottom); ``padding="same"`` puts the odd
    one on the right and bottom, as PyTorch does."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0, 0, 0
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = (conv.padding, conv.padding) if isinstance(conv.padding, int) else conv.padding
    return pw, pw, ph, ph


def _normalised(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the BatchNorm part of a norm + activation layer computes in eval mode."""
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, m.running_mean is None, 0.0, m.eps)


def _tail(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    drop = getattr(m, "drop", None)
    return m.act(drop(x) if isinstance(drop, nn.Module) else x)


def activation_family(act: nn.Module) -> str:
    """``"relu"`` (exactly 0 at and below 0, positive above: ReLU, ReLU6, a ReLU by another name),
    ``"identity"`` (no activation) or ``"other"`` (SiLU, GELU, Hardswish, ...), read off what ``act`` returns."""
    x = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        y = act(x.clone())
    if torch.equal(y, x):
        return "identity"
    if bool((y[x <= 0] == 0).all()) and bool((y[x > 0] > 0).all()):
        return "relu"
    return "other"


def check_layer(m: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """One line naming the layer unless ``m`` (one :func:`is_leaf` keeps whole) computes what it is read as (its
    base layer; a BatchNorm then an elementwise activation) on a random input of the per-sample ``shape`` it reads
    in the network, in eval mode."""
    norm_act = is_norm_act(m)
    base = "a BatchNorm followed by an elementwise activation" if norm_act else _base(m).__name__
    device = next((t.device for t in m.state_dict().values()), torch.device("cpu"))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            theirs = m(x.clone())
            if norm_act:
                ours = _tail(m, _normalised(m, x))
                flat = x.flatten()
                perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1)).to(device)
                # to rounding: a vectorised activation may round an element differently at another position
                elementwise = torch.allclose(m.act(flat[perm].clone()), m.act(flat.clone())[perm], rtol=1e-5,
                                             atol=1e-6)
            else:
                ours, elementwise = _base(m).forward(m, x), True
    except Exception as e:  # noqa: BLE001 - a layer that fails here is not one cnnmod can read
        raise UserError(f"cnnmod cannot read the layer {name!r} ({type(m).__name__}, {type(e).__name__}) as "
                        f"{base}")
    finally:
        m.train(was)
    gap = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else float("inf")
    if gap > 1e-5 * (float(ours.abs().max()) + 1.0) or not elementwise:
        raise UserError(f"the layer {name!r} ({type(m).__name__}) computes something besides {base} (differs by "
                        f"{gap:.2g}); cnnmod reads such a layer only where it computes what it subclasses")


# ------------------------------------------------------------------ logits combined from several linear heads
def linear_heads(gm: torch.fx.GraphModule, node) -> list | None:
    """The linear layers' nodes that ``node`` of ``gm`` is computed from, where what lies between them and it is
    functions alone (sums, products with values that do not depend on the input, stacking): the first linear layer
    on every path from the input back from ``node``; None where another layer lies on such a path, or a path
    reaches the input without one."""
    depends: dict = {}
    for n in gm.graph.nodes:  # whether a node's value depends on the network's input
        depends[n] = n.op == "placeholder" or any(depends.get(a, False) for a in n.all_input_nodes)
    heads, seen, todo = [], set(), [node] if isinstance(node, torch.fx.Node) else []
    while todo:
        n = todo.pop()
        if n in seen or not depends.get(n, False):
            continue
        seen.add(n)
        if n.op == "call_module":
            if not isinstance(gm.get_submodule(n.target), nn.Linear):
                return None
            heads.append(n)
        elif n.op in ("call_function", "call_method"):
            todo.extend(n.all_input_nodes)
        else:
            return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(heads, key=order.__getitem__) or None


def combines_linear_heads(gm: torch.fx.GraphModule, node) -> bool:
    """Whether ``node`` of ``gm`` is computed from several linear layers' outputs by functions alone (DeiT's
    distillation heads averaged, EfficientViM's heads weighted and summed)."""
    heads = linear_heads(gm, node)
    return heads is not None and len(heads) >= 2


def copied(net: nn.Module) -> nn.Module:
    """A deep copy of ``net``, tensors that its layers keep computed from their parameters (timm's attention bias
    caches, filled in a forward pass with gradients on) copied detached: ``copy.deepcopy`` refuses those."""
    memo: dict[int, torch.Tensor] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            if value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for m in net.modules():
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(v)
    return copy.deepcopy(net, memo)
