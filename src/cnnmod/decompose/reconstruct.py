"""The kept weights of a cut network refitted by least squares to give the source model's own outputs back
(``SlimSettings.reconstruct``; docs/method.md, "Slim modules"): the reconstruction step of post-training channel
pruning (He et al. 2017; ThiNet), no loss, no label, no gradient step. :func:`refit_layers` is the one entry;
:class:`~cnnmod.decompose.pruner.Pruner` calls it after its last step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

INPUTS = 512  # inputs (of a pruning step's) each layer is refitted on
POSITIONS = 64  # output positions per image a convolution is refitted at
RIDGE = 1e-3  # the refit's ridge towards the current weights, times the inputs' mean energy


class _Caught(Exception):
    """Stops a forward pass once a hook has what it came for."""


def _caught(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input (as its pre-hooks leave it) in ``net``'s forward pass on ``x``, the pass stopped there."""
    got = {}

    def hook(_m, inputs):
        got["v"] = inputs[0].detach()
        raise _Caught

    handle = layer.register_forward_pre_hook(hook)  # registered last: runs after the gates' pre-hooks
    try:
        with torch.no_grad():
            net(x)
    except _Caught:
        pass
    finally:
        handle.remove()
    return got["v"]


def _positions(layer: nn.Module, shape: torch.Size, generator: torch.Generator) -> tuple | None:
    """For a convolution with output ``shape`` (B, C, H, W): :data:`POSITIONS` random output positions (row,
    column), or None for a linear layer."""
    if isinstance(layer, nn.Linear):
        return None
    h, w = shape[2], shape[3]
    pick = torch.randperm(h * w, generator=generator)[:POSITIONS]
    return pick // w, pick % w


def _patches(layer: nn.Module, given: torch.Tensor, pick: tuple | None) -> torch.Tensor:
    """(rows, inputs) of ``layer`` as a matrix product: a linear layer's batch, or a convolution's input patches
    at the output positions ``pick``, laid out as its weight's input dimensions (channel, kernel row, column)."""
    if pick is None:
        return given.reshape(-1, given.shape[-1])
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    padded = nn.functional.pad(given, (pw, pw, ph, ph))
    rows = (pick[0] * sh)[:, None] + torch.arange(kh) * dh  # (P, kh)
    cols = (pick[1] * sw)[:, None] + torch.arange(kw) * dw  # (P, kw)
    device = given.device
    patches = padded[:, :, rows.to(device)[:, :, None], cols.to(device)[:, None, :]]  # (B, C, P, kh, kw)
    return patches.permute(0, 2, 1, 3, 4).reshape(-1, given.shape[1] * kh * kw)


def _model_outputs(src: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor],
                   generator: torch.Generator) -> tuple[list, list[list[torch.Tensor]]]:
    """One pass of the source model over ``batches``: per layer, the output positions it is refitted at, and per
    batch its outputs there less its bias, as (rows, outputs) in the order :func:`_patches` lays inputs out."""
    picks: list = [None] * len(layers)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(k: int):
        def keep(layer, _inputs, out):
            if isinstance(layer, nn.Conv2d):
                if picks[k] is None:
                    picks[k] = _positions(layer, out.shape, generator)
                r, c = picks[k]
                out = out[:, :, r.to(out.device), c.to(out.device)].transpose(1, 2)  # (B, P, C)
            if layer.bias is not None:
                out = out - layer.bias
            outputs[k].append(out.reshape(-1, out.shape[-1]).detach())
        return keep

    handles = [layer.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
    training = src.training
    src.eval()
    try:
        with torch.no_grad():
            for xb in batches:
                src(xb)
    finally:
        src.train(training)
        for h in handles:
            h.remove()
    return picks, outputs


def refit_layers(net: nn.Module, source: nn.Module, gating: Callable[[], AbstractContextManager],
                 batches: list[torch.Tensor], head: str, seed: int) -> None:
    """Every convolution (groups 1, zero padding) and linear layer of ``net`` but ``head``, in the order ``net``
    declares them (the zoo's networks: their forward order), refitted so that its outputs match those of the
    layer of the same name in ``source`` (an uncut copy) on ``batches``, its inputs being what ``net`` feeds it
    inside ``gating()`` (a cut network: the closed channels not read; the layers before it already refitted).
    Least squares on :data:`POSITIONS` random output positions of each image, ridge towards the current weights
    (:data:`RIDGE` times the inputs' mean energy): a layer whose inputs lost nothing keeps its weights. ``net``'s
    BatchNorm statistics become ``source``'s (the refitted outputs are the model's); re-estimate them after."""
    theirs = dict(source.named_modules())
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(theirs[name].running_mean)
                m.running_var.copy_(theirs[name].running_var)
    layers = [(n, m) for n, m in net.named_modules() if n != head and (
        isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros")]
    generator = torch.Generator().manual_seed(seed)
    picks, targets = _model_outputs(source, [theirs[n] for n, _ in layers], batches, generator)
    for k, (_, layer) in enumerate(layers):
        if len(targets[k]) != len(batches):  # not run by the forward pass, or run more than once: left as it is
            continue
        a = b = 0.0
        for i, xb in enumerate(batches):
            with gating():
                given = _caught(net, layer, xb)
            inp = _patches(layer, given, picks[k])
            a = a + (inp.T @ inp).double()
            b = b + (inp.T @ targets[k][i].to(inp.device)).double()
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        lam = RIDGE * float(a.diagonal().mean()) + 1e-12
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        fitted = torch.linalg.solve(a + lam * eye, b + lam * weight.T).T
        with torch.no_grad():
            layer.weight.copy_(fitted.reshape(layer.weight.shape).to(layer.weight.dtype))
