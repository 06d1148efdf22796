"""A linear layer followed by a BatchNorm over its outputs, read as one linear layer.

LeViT (as timm builds it) writes every linear layer as ``LinearNorm``: ``bn(linear(x).flatten(0, 1))`` reshaped
back, a BatchNorm1d over the tokens folded into the batch. In eval mode that is one linear map, ``W * s`` and
``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output. :func:`fold_linear_norms` replaces every
such module by that ``nn.Linear``, each checked on the input it reads in the network's forward pass, so that what
follows (the MLP's hidden units, channels) is sliced as plain linear layers are.
"""

from __future__ import annotations

import torch
from torch import nn


def _parts(m: nn.Module) -> tuple[nn.Linear, nn.BatchNorm1d] | None:
    """(linear, BatchNorm) where ``m``'s children are those two (dropout or identity besides), the BatchNorm over
    the linear layer's outputs, with statistics."""
    children = [c for c in m.children() if not isinstance(c, (nn.Dropout, nn.Identity))]
    if len(children) != 2 or list(m.parameters(recurse=False)):
        return None
    lin = next((c for c in children if type(c) is nn.Linear), None)
    bn = next((c for c in children if type(c) is nn.BatchNorm1d), None)
    if lin is None or bn is None or bn.num_features != lin.out_features or bn.running_var is None:
        return None
    return lin, bn


def folded(lin: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """``bn(lin(x))`` in eval mode as one linear layer."""
    s = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    bias = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else 0.0
    out = nn.Linear(lin.in_features, lin.out_features).to(lin.weight.device)
    with torch.no_grad():
        out.weight.copy_(lin.weight * s[:, None])
        out.bias.copy_((bias - bn.running_mean) * s + shift)
    return out.requires_grad_(lin.weight.requires_grad)


def has_linear_norms(net: nn.Module) -> bool:
    return any(_parts(m) is not None for n, m in net.named_modules() if n)


@torch.no_grad()
def fold_linear_norms(net: nn.Module, input_shape: tuple[int, ...] | None) -> nn.Module:
    """``net`` (changed in place, in eval mode) with every linear + BatchNorm module folded into one linear layer
    where that computes what the module computes on the input it reads in ``net`` (a random input of
    ``input_shape``)."""
    found = [(n, m, p) for n, m in net.named_modules() if n and (p := _parts(m)) is not None]
    if not found or input_shape is None:
        return net
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0]) if a and isinstance(
        a[0], torch.Tensor) else None) for n, m, _ in found]
    was = net.training
    net.eval()
    try:
        net(torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(
            next(net.parameters()).device))
    except Exception:  # noqa: BLE001 - the forward's own failure is reported where the model is read
        return net
    finally:
        net.train(was)
        for h in hooks:
            h.remove()
    for name, m, (lin, bn) in found:
        x = seen.get(name)
        if x is None:
            continue
        one = folded(lin, bn)
        was = m.training
        m.eval()
        theirs, ours = m(x), one(x)
        m.train(was)
        if theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5 * (1 + float(theirs.abs().max()))):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, one)
    return net
