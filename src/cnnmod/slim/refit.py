"""The kept weights of a cut network refitted by least squares to give the source model's own outputs back
(``SlimSettings.reconstruct``; docs/method.md, "Slim modules"): the reconstruction step of post-training channel
pruning (He et al. 2017; ThiNet), no loss, no label, no gradient step. :func:`refit_layers` is the one entry;
:class:`~cnnmod.slim.pruner.Pruner` calls it after its last step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..core.layers import conv_pads

INPUTS = 512  # inputs (of a pruning step's) each layer is refitted on
POSITIONS = 64  # output positions per image a convolution is refitted at
RIDGE = 1e-3  # the refit's ridge towards the current weights, times the inputs' mean energy
ONE_PASS_BYTES = 2 ** 28  # the refit runs as one forward pass over all its inputs when the source's largest
                          # layer output over all of them stays under this; else one pass per layer


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
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    padded = nn.functional.pad(given, conv_pads(layer))
    rows = (pick[0] * sh)[:, None] + torch.arange(kh) * dh  # (P, kh)
    cols = (pick[1] * sw)[:, None] + torch.arange(kw) * dw  # (P, kw)
    device = given.device
    patches = padded[:, :, rows.to(device)[:, :, None], cols.to(device)[:, None, :]]  # (B, C, P, kh, kw)
    return patches.permute(0, 2, 1, 3, 4).reshape(-1, given.shape[1] * kh * kw)


def _model_outputs(src: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor],
                   generator: torch.Generator,
                   kept: list[torch.Tensor | None]) -> tuple[list, list[list[torch.Tensor]], int]:
    """One pass of the source model over ``batches``: per layer, the output positions it is refitted at, and per
    batch its outputs there less its bias (only its ``kept`` outputs, where given), as (rows, outputs) in the
    order :func:`_patches` lays inputs out; and the bytes of the largest of those layers' outputs for one
    input."""
    picks: list = [None] * len(layers)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    largest = 0

    def hook(k: int):
        def keep(layer, _inputs, out):
            nonlocal largest
            largest = max(largest, out[0].numel() * out.element_size())
            if isinstance(layer, nn.Conv2d):
                if picks[k] is None:
                    picks[k] = _positions(layer, out.shape, generator)
                r, c = picks[k]
                out = out[:, :, r.to(out.device), c.to(out.device)].transpose(1, 2)  # (B, P, C)
            if layer.bias is not None:
                out = out - layer.bias
            if kept[k] is not None:
                out = out[..., kept[k].to(out.device)]
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
    return picks, outputs, largest


def _solve(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``layer``'s weight set to the ridge least-squares solution of the normal equations ``a`` (inputs' Gram
    matrix) and ``b`` (inputs times targets), pulled towards its current weights by :data:`RIDGE` times the mean
    energy of the inputs it reads."""
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    energy = a.diagonal()
    read = energy > 0  # a closed channel (gated, or cut) is not read: it does not dilute the mean
    lam = RIDGE * (float(energy[read].mean()) if bool(read.any()) else 0.0) + 1e-12
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    fitted = torch.linalg.solve(a + lam * eye, b + lam * weight.T).T
    with torch.no_grad():
        layer.weight.copy_(fitted.reshape(layer.weight.shape).to(layer.weight.dtype))


def _outputs(m: nn.Module | None) -> int | None:
    for name in ("out_channels", "out_features", "num_features"):
        if isinstance(getattr(m, name, None), int):
            return getattr(m, name)
    return None


def _normal_equations(layer: nn.Module, given: torch.Tensor, pick: tuple | None,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms one batch adds to the normal equations of ``layer``'s refit: its input patches' Gram matrix and
    their product with the model's outputs ``target``."""
    inp = _patches(layer, given, pick)
    return (inp.T @ inp).double(), (inp.T @ target.to(inp.device)).double()


def refit_layers(net: nn.Module, source: nn.Module, gating: Callable[[], AbstractContextManager],
                 batches: list[torch.Tensor], head: str, seed: int,
                 kept: dict[str, torch.Tensor] | None = None) -> None:
    """Every convolution (groups 1, zero padding) and linear layer of ``net`` but ``head``, in the order ``net``
    declares them (the zoo's networks: their forward order), refitted so that its outputs match those of the
    layer of the same name in ``source`` (an uncut copy) on ``batches``, its inputs being what ``net`` feeds it
    inside ``gating()`` (a cut network: the closed channels not read; the layers before it already refitted).
    Least squares on :data:`POSITIONS` random output positions of each image, ridge towards the current weights
    (:data:`RIDGE` times the inputs' mean energy): a layer whose inputs lost nothing keeps its weights. ``net``'s
    BatchNorm statistics become ``source``'s: every layer is refitted under them, to outputs that are the model's.
    ``kept``: per layer of ``net`` that computes fewer outputs than ``source``'s (``net`` sliced), the indices of
    the source's outputs it still computes."""
    theirs = dict(source.named_modules())
    # only where ``net``'s layer does compute that many outputs (a layer a group's slicing left whole, as where a
    # gate multiplies the group's channels, computes the source's all)
    kept = {n: idx for n, idx in (kept or {}).items() if _outputs(dict(net.named_modules()).get(n)) == idx.numel()}
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                idx = kept.get(name, slice(None))
                m.running_mean.copy_(theirs[name].running_mean[idx])
                m.running_var.copy_(theirs[name].running_var[idx])
    layers = [(n, m) for n, m in net.named_modules() if n != head and (
        isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros")]
    generator = torch.Generator().manual_seed(seed)
    picks, targets, largest = _model_outputs(source, [theirs[n] for n, _ in layers], batches, generator,
                                             [kept.get(n) for n, _ in layers])
    # a layer not run by the forward pass, or run more than once, is left as it is
    fitted = [(k, layer) for k, (_, layer) in enumerate(layers) if len(targets[k]) == len(batches)]
    if largest * sum(xb.shape[0] for xb in batches) <= ONE_PASS_BYTES:
        _refit_in_one_pass(net, fitted, picks, targets, torch.cat(batches), gating)
        return
    for k, layer in fitted:
        a = b = 0.0
        for i, xb in enumerate(batches):
            with gating():
                given = _caught(net, layer, xb)
            da, db = _normal_equations(layer, given, picks[k], targets[k][i])
            a, b = a + da, b + db
        _solve(layer, a, b)


def _refit_in_one_pass(net: nn.Module, fitted: list[tuple[int, nn.Module]], picks: list,
                       targets: list[list[torch.Tensor]], x: torch.Tensor,
                       gating: Callable[[], AbstractContextManager]) -> None:
    """:func:`refit_layers` in one forward pass of ``net`` over all inputs ``x`` at once: each layer refitted as
    the pass reaches it (a pre-hook, after the gates'), so that the layers after it read what the refitted
    layer computes, as a pass per layer would give them."""

    def fit(k: int):
        def pre(layer, inputs):
            _solve(layer, *_normal_equations(layer, inputs[0].detach(), picks[k], torch.cat(targets[k])))
        return pre

    with gating():
        handles = [layer.register_forward_pre_hook(fit(k)) for k, layer in fitted]
        try:
            with torch.no_grad():
                net(x)
        finally:
            for h in handles:
                h.remove()
