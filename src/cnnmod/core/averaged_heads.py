"""Outputs that combine several linear heads, read as one linear head.

A distilled transformer (DeiT's distillation token, LeViT, RepViT, EfficientFormer V2, SwiftFormer as timm builds
them) ends in two classifiers whose logits it averages: ``(head(x_cls) + head_dist(x_dist)) / 2``, each on its own
token or both on the same pooled features; EfficientViM sums a head per stage, each weighted by a learned softmax.
Whatever the functions between the heads and the output, where the output is an affine map of the heads' inputs
side by side it is one linear layer on them. :func:`one_head` rewrites such a network's graph so that it ends in
that one ``nn.Linear`` (``averaged_head``): its weight and bias read off the part of the graph after the heads
(run in double precision on the zero vector and each unit vector), checked to be affine on random vectors and to
give the network's logits; everything that reads a classifier (the binary heads of modules, slicing, merged
compositions) then reads it as any other. :func:`slicing_form` is the network slim modules are cut from: linear +
BatchNorm layers folded, attention in its canonical form, then one head.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError
from .attention import canonical
from .folding import fold_linear_norms
from .graph import trace
from .layers import copied, linear_heads

LAYER = "averaged_head"  # the name of the one linear layer a rewritten network ends in


def _maybe(net: nn.Module) -> bool:
    """Cheap test before tracing: the network has two linear layers with as many outputs as its last one."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return len(linears) >= 2 and sum(m.out_features == linears[-1].out_features for m in linears) >= 2


def _tail(gm: torch.fx.GraphModule, inputs: list, result) -> torch.fx.GraphModule:
    """The part of ``gm`` that computes ``result`` from the nodes ``inputs``, as a module of its own taking them."""
    graph, env, needed, todo = torch.fx.Graph(), {}, set(), [result]
    while todo:
        n = todo.pop()
        if n not in needed and n not in inputs:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"x{i}")
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[result])
    return torch.fx.GraphModule(gm, graph)


def _affine(tail: torch.fx.GraphModule, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(M, c) with ``tail(z) = M z + c`` for z the inputs side by side (``widths`` features each), or None where
    ``tail`` is not affine in them."""
    tail = copied(tail).double().eval()
    device = next(iter(tail.parameters()), torch.zeros(())).device
    total = sum(widths)
    probe = torch.cat([torch.zeros(1, total, dtype=torch.float64), torch.eye(total, dtype=torch.float64),
                       torch.randn(3, total, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    with torch.no_grad():
        out = tail(*probe.to(device).split(widths, dim=1))
    if out.dim() != 2 or out.shape[0] != probe.shape[0]:
        return None
    c = out[0]
    m = (out[1:total + 1] - c).T
    random = probe[total + 1:].to(device)
    expected = random @ m.T + c
    if not torch.allclose(out[total + 1:], expected, atol=1e-9 * (1 + float(expected.abs().max()))):
        return None
    return m, c


def one_head(net: nn.Module, input_shape: tuple[int, ...] | None) -> nn.Module:
    """``net``, or, where its output is an affine map of several linear layers' (B, F) inputs side by side, a
    :class:`torch.fx.GraphModule` of it that ends in one linear layer :data:`LAYER` on those inputs concatenated
    (checked on a random input to give the same logits, to rounding; else ``net`` unchanged)."""
    if input_shape is None or not _maybe(net):
        return net
    try:
        gm, _ = trace(net)
    except UserError:
        return net
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    heads = linear_heads(gm, result) if isinstance(result, torch.fx.Node) else None
    if heads is None or len(heads) < 2:
        return net
    device = next(net.parameters()).device
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        ShapeProp(gm).propagate(x)
    except Exception:  # noqa: BLE001 - a forward that fails is reported where the model is read
        return net
    inputs = list(dict.fromkeys(h.args[0] for h in heads))  # each head's input once, in the graph's order
    if any(not isinstance(i, torch.fx.Node) or len(i.meta["tensor_meta"].shape) != 2 for i in inputs):
        return net  # a linear layer on tokens, not a classifier on features
    found = _affine(_tail(gm, inputs, result), [int(i.meta["tensor_meta"].shape[1]) for i in inputs])
    if found is None:
        return net
    m, c = found
    merged = nn.Linear(m.shape[1], m.shape[0]).to(device)
    with torch.no_grad():
        merged.weight.copy_(m)
        merged.bias.copy_(c)
    merged.requires_grad_(gm.get_submodule(heads[0].target).weight.requires_grad)
    gm.add_submodule(LAYER, merged)
    with gm.graph.inserting_before(result):
        joined = gm.graph.call_function(torch.cat, (inputs, 1)) if len(inputs) > 1 else inputs[0]
        head = gm.graph.call_module(LAYER, (joined,))
    result.replace_all_uses_with(head)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    was = net.training
    net.eval()
    gm.eval()
    with torch.no_grad():
        expected, got = net(x), gm(x)
    net.train(was)
    gm.train(was)
    scale = 1 + float(expected.abs().max())
    return gm if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5 * scale) else net


def slicing_form(net: nn.Module, heads: dict[str, int] | None, input_shape: tuple[int, ...] | None,
                 whole=None) -> nn.Module:
    """The form of ``net`` that slim modules are cut from and rebuilt as: linear + BatchNorm modules folded
    (:func:`cnnmod.core.folding.fold_linear_norms`), its attention converted (:func:`cnnmod.core.attention.canonical`,
    ``heads`` and ``whole`` as it takes them), then averaged heads read as one (:func:`one_head`)."""
    net = fold_linear_norms(net, input_shape)
    return one_head(canonical(net, heads, input_shape, whole=whole), input_shape)
