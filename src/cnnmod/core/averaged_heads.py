"""Outputs that average several linear heads, read as one linear head.

A distilled transformer (DeiT's distillation token, LeViT, RepViT, EfficientFormer V2, SwiftFormer as timm builds
them) ends in two classifiers whose logits it averages: ``(head(x_cls) + head_dist(x_dist)) / 2``, each on its own
token or both on the same pooled features. That is one linear map of the heads' inputs side by side:
``[W_1 / k ... W_k / k] @ cat(x_1 ... x_k) + mean(b)``. :func:`one_head` rewrites such a network's graph so that it
ends in that one ``nn.Linear`` (``averaged_head``), checked to compute the network's logits, and everything that
reads a classifier (the binary heads of modules, slicing, merged compositions) reads it as any other.
:func:`slicing_form` is the network slim modules are cut from: attention in its canonical form, then one head.
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
from .layers import averages_linear_heads, linear_terms

LAYER = "averaged_head"  # the name of the one linear layer a rewritten network ends in


def _maybe(net: nn.Module) -> bool:
    """Cheap test before tracing: the network's last two linear layers give as many outputs."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return len(linears) >= 2 and linears[-1].out_features == linears[-2].out_features


def one_head(net: nn.Module, input_shape: tuple[int, ...] | None) -> nn.Module:
    """``net``, or, where its output is the mean of k linear layers' outputs on (B, F) inputs, a
    :class:`torch.fx.GraphModule` of it that ends in one linear layer :data:`LAYER` on the k inputs concatenated
    (checked on a random input to give the same logits, to rounding; else ``net`` unchanged)."""
    if input_shape is None or not _maybe(net):
        return net
    try:
        gm, _ = trace(net)
    except UserError:
        return net
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not averages_linear_heads(gm, result):
        return net
    terms = linear_terms(result.args[0], gm)
    device = next(net.parameters()).device
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        ShapeProp(gm).propagate(x)
    except Exception:  # noqa: BLE001 - a forward that fails is reported where the model is read
        return net
    inputs = [t.args[0] for t in terms]
    if any(len(i.meta["tensor_meta"].shape) != 2 for i in inputs):
        return net  # a linear layer on tokens, not a classifier on features
    layers = [gm.get_submodule(t.target) for t in terms]
    k = len(layers)
    merged = nn.Linear(sum(m.in_features for m in layers), layers[0].out_features).to(device)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([m.weight / k for m in layers], 1))
        merged.bias.copy_(sum(m.bias if m.bias is not None else torch.zeros_like(merged.bias) for m in layers) / k)
    merged.requires_grad_(layers[0].weight.requires_grad)
    gm.add_submodule(LAYER, merged)
    with gm.graph.inserting_before(result):
        joined = gm.graph.call_function(torch.cat, (inputs, 1))
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
