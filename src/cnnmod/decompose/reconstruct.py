"""The kept weights of a cut network refitted by least squares to give the source model's own outputs back
(``SlimSettings.reconstruct``; docs/method.md, "Slim modules"): the reconstruction step of post-training channel
pruning (He et al. 2017; ThiNet), with its multi-branch case (a residual branch refitted to the model's sum), no
loss, no label, no gradient step. :func:`refit_layers` is the one entry;
:class:`~cnnmod.decompose.pruner.Pruner` calls it after its last step."""

from __future__ import annotations

import operator
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import fx, nn

INPUTS = 512  # inputs (of a pruning step's) each layer is refitted on
POSITIONS = 64  # output positions per image a convolution is refitted at
RIDGE = 1e-3  # the refit's ridge towards the current weights, times the inputs' mean energy
ONE_PASS_BYTES = 2 ** 28  # the refit runs as one forward pass over all its inputs when the source's largest
                          # layer output over all of them stays under this; else one pass per layer


ADDS = (operator.add, operator.iadd, torch.add)  # a residual sum: what a branch's last layer is refitted through


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


def _at(value: torch.Tensor, pick: tuple | None) -> torch.Tensor:
    """(rows, channels): a layer output's values at the output positions ``pick`` (all rows of a linear layer's),
    in the order :func:`_patches` lays inputs out."""
    if pick is not None:
        r, c = pick
        value = value[:, :, r.to(value.device), c.to(value.device)].transpose(1, 2)  # (B, P, C)
    return value.reshape(-1, value.shape[-1])


class _Sums(fx.Interpreter):
    """A forward pass of a network along its traced graph, each residual sum of ``ends`` (add node -> the refit
    layer indices whose branch ends there) seen first by ``at_sum(node, env)``."""

    def __init__(self, net: nn.Module, graph: fx.Graph, at_sum: Callable) -> None:
        super().__init__(net, graph=graph)
        self.at_sum = at_sum

    def run_node(self, n: fx.Node):
        self.at_sum(n, self.env, before=True)
        value = super().run_node(n)
        self.at_sum(n, value, before=False)
        return value


def _branch_ends(graph: fx.Graph, index: dict[str, int], modules: dict[str, nn.Module]) -> dict[int, tuple]:
    """Refit layers whose output reaches a residual sum through at most a BatchNorm, each used once there:
    layer index -> (its node, the BatchNorm's node or None, the sum's node, the sum's other input node)."""
    ends = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ADDS or len(node.args) < 2 or not all(
                isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        for mine, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            bn, n = None, mine
            if n.op == "call_module" and isinstance(modules.get(n.target), nn.modules.batchnorm._BatchNorm) and \
                    len(n.users) == 1 and n.args and isinstance(n.args[0], fx.Node):
                bn, n = n, n.args[0]
            if n.op == "call_module" and n.target in index and len(n.users) == 1 and index[n.target] not in ends \
                    and _same_shape(n, node, other):
                ends[index[n.target]] = (n, bn, node, other)
    return ends


def _same_shape(*nodes: fx.Node) -> bool:
    """Whether the traced shapes of ``nodes`` are known and alike (a sum that broadcasts is not refitted through)."""
    shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in nodes]
    return shapes[0] is not None and all(sh == shapes[0] for sh in shapes)


def _model_outputs(src: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor],
                   generator: torch.Generator, graph: fx.Graph | None = None,
                   ends: dict[int, tuple] | None = None) -> tuple[list, list[list[torch.Tensor]], int, dict]:
    """One pass of the source model over ``batches``: per layer, the output positions it is refitted at, and per
    batch its outputs there less its bias, as (rows, outputs) in the order :func:`_patches` lays inputs out; the
    bytes of the largest of those layers' outputs for one input; and for every branch end of ``ends`` (run along
    ``graph``), per batch the model's residual sum at its positions."""
    picks: list = [None] * len(layers)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    largest = 0

    def hook(k: int):
        def keep(layer, _inputs, out):
            nonlocal largest
            largest = max(largest, out[0].numel() * out.element_size())
            if isinstance(layer, nn.Conv2d) and picks[k] is None:
                picks[k] = _positions(layer, out.shape, generator)
            out = _at(out, picks[k])
            if layer.bias is not None:
                out = out - layer.bias
            outputs[k].append(out.detach())
        return keep

    sums: dict[int, list[torch.Tensor]] = {k: [] for k in ends or {}}
    by_sum: dict[fx.Node, list[int]] = {}
    for k, (_, _, add, _) in (ends or {}).items():
        by_sum.setdefault(add, []).append(k)

    def at_sum(n, value, before):
        if not before:
            for k in by_sum.get(n, []):
                sums[k].append(_at(value, picks[k]).detach().clone())

    handles = [layer.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
    training = src.training
    src.eval()
    try:
        run = _Sums(src, graph, at_sum).run if ends else src
        with torch.no_grad():
            for xb in batches:
                run(xb)
    finally:
        src.train(training)
        for h in handles:
            h.remove()
    return picks, outputs, largest, sums


def _solve(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``layer``'s weight set to the ridge least-squares solution of the normal equations ``a`` (inputs' Gram
    matrix) and ``b`` (inputs times targets), pulled towards its current weights."""
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    lam = RIDGE * float(a.diagonal().mean()) + 1e-12
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    fitted = torch.linalg.solve(a + lam * eye, b + lam * weight.T).T
    with torch.no_grad():
        layer.weight.copy_(fitted.reshape(layer.weight.shape).to(layer.weight.dtype))


def _normal_equations(layer: nn.Module, given: torch.Tensor, pick: tuple | None,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms one batch adds to the normal equations of ``layer``'s refit: its input patches' Gram matrix and
    their product with the model's outputs ``target``."""
    inp = _patches(layer, given, pick)
    return (inp.T @ inp).double(), (inp.T @ target.to(inp.device)).double()


def refit_layers(net: nn.Module, source: nn.Module, gating: Callable[[], AbstractContextManager],
                 batches: list[torch.Tensor], head: str, seed: int, graph: fx.Graph | None = None) -> None:
    """Every convolution (groups 1, zero padding) and linear layer of ``net`` but ``head``, in the order ``net``
    declares them (the zoo's networks: their forward order), refitted so that its outputs match those of the
    layer of the same name in ``source`` (an uncut copy) on ``batches``, its inputs being what ``net`` feeds it
    inside ``gating()`` (a cut network: the closed channels not read; the layers before it already refitted).
    Least squares on :data:`POSITIONS` random output positions of each image, ridge towards the current weights
    (:data:`RIDGE` times the inputs' mean energy): a layer whose inputs lost nothing keeps its weights. ``net``'s
    BatchNorm statistics become ``source``'s: every layer is refitted under them, to outputs that are the model's.
    With ``graph`` (``net``'s traced graph, as :class:`~cnnmod.core.graph.ModelGraph` traced it), a residual
    branch's last layer (:func:`_branch_ends`) is refitted to the model's sum less the sum's other input as the cut
    network computes it, back through its BatchNorm (He et al. 2017, the multi-branch case): the block's output is
    made the model's, not the branch's."""
    theirs = dict(source.named_modules())
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(theirs[name].running_mean)
                m.running_var.copy_(theirs[name].running_var)
    layers = [(n, m) for n, m in net.named_modules() if n != head and (
        isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros")]
    generator = torch.Generator().manual_seed(seed)
    ends = {}
    if graph is not None:
        ends = _branch_ends(graph, {n: k for k, (n, _) in enumerate(layers)}, dict(net.named_modules()))
    picks, targets, largest, sums = _model_outputs(source, [theirs[n] for n, _ in layers], batches, generator,
                                                   graph, ends)
    # a layer not run by the forward pass, or run more than once, is left as it is
    fitted = [(k, layer) for k, (_, layer) in enumerate(layers) if len(targets[k]) == len(batches)]
    one_pass = largest * sum(xb.shape[0] for xb in batches) <= ONE_PASS_BYTES
    if one_pass:
        _refit_in_one_pass(net, fitted, picks, targets, torch.cat(batches), gating, graph,
                           {k: (*ends[k], torch.cat(sums[k])) for k, _ in fitted if k in ends})
        return
    mods = dict(net.named_modules())
    for k, layer in fitted:
        a = b = 0.0
        for i, xb in enumerate(batches):
            if k in ends:  # a branch end: to the model's sum less the other input, as the cut network has it
                bn = ends[k][1]
                with gating():
                    given, there = _caught_at_sum(net, graph, layer, ends[k], xb)
                target = _compensated(sums[k][i], _at(there, picks[k]), layer,
                                      mods[bn.target] if bn is not None else None)
            else:
                with gating():
                    given = _caught(net, layer, xb)
                target = targets[k][i]
            da, db = _normal_equations(layer, given, picks[k], target)
            a, b = a + da, b + db
        _solve(layer, a, b)


def _caught_at_sum(net: nn.Module, graph: fx.Graph, layer: nn.Module, end: tuple,
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a branch end (``end``: its node, BatchNorm node, sum node, other input node): ``layer``'s input (as its
    pre-hooks leave it) and the sum's other input, in ``net``'s forward pass on ``x`` along ``graph``, the pass
    stopped at the sum."""
    got = {}

    def hook(_m, inputs):
        got["given"] = inputs[0].detach()

    def at_sum(n, env, before):
        if before and n is end[2]:
            got["other"] = env[end[3]].detach()
            raise _Caught

    handle = layer.register_forward_pre_hook(hook)  # registered last: runs after the gates' pre-hooks
    try:
        with torch.no_grad():
            _Sums(net, graph, at_sum).run(x)
    except _Caught:
        pass
    finally:
        handle.remove()
    return got["given"], got["other"]


def _compensated(target_sum: torch.Tensor, other: torch.Tensor, layer: nn.Module,
                 bn: nn.Module | None) -> torch.Tensor:
    """What a residual branch's last layer must output (less its bias) for the sum to be the model's when the other
    input is the cut network's ``other``: back through its BatchNorm (eval: an affine map per channel) when it has
    one (a channel it scales by nearly zero: as if by one; what the layer gives there barely counts)."""
    want = (target_sum - other).double()
    if bn is not None:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = (bn.bias.double() if bn.affine else 0.0) - scale * bn.running_mean.double()
        want = (want - shift) / torch.where(scale.abs() > 1e-8, scale, torch.ones_like(scale))
    if layer.bias is not None:
        want = want - layer.bias.double()
    return want.float()


def _refit_in_one_pass(net: nn.Module, fitted: list[tuple[int, nn.Module]], picks: list,
                       targets: list[list[torch.Tensor]], x: torch.Tensor,
                       gating: Callable[[], AbstractContextManager], graph: fx.Graph | None = None,
                       ends: dict[int, tuple] | None = None) -> None:
    """:func:`refit_layers` in one forward pass of ``net`` over all inputs ``x`` at once: each layer refitted as
    the pass reaches it (a pre-hook, after the gates'), so that the layers after it read what the refitted
    layer computes, as a pass per layer would give them. A branch end of ``ends`` (layer index -> its node, its
    BatchNorm's node, the sum's node, the other input's node, the model's sums at its positions) is refitted when
    the pass reaches the sum, to the model's sum less the other input as the cut network computes it (He et al.
    2017, the multi-branch case), and its branch computed again before the sum."""
    ends = ends or {}
    given: dict[int, torch.Tensor] = {}
    mods = dict(net.named_modules())
    by_sum: dict[fx.Node, list[int]] = {}
    for k, (_, _, add, _, _) in ends.items():
        by_sum.setdefault(add, []).append(k)
    layer_of = dict(fitted)

    def fit(k: int):
        def pre(layer, inputs):
            if k in ends:
                given[k] = inputs[0].detach()
            else:
                _solve(layer, *_normal_equations(layer, inputs[0].detach(), picks[k], torch.cat(targets[k])))
        return pre

    def at_sum(n, env, before):
        if not before:
            return
        for k in by_sum.get(n, []):
            node, bn_node, _, other, model_sum = ends[k]
            layer, bn = layer_of[k], mods[bn_node.target] if bn_node is not None else None
            want = _compensated(model_sum, _at(env[other], picks[k]), layer, bn)
            inputs = given.pop(k)  # as the gates left them
            _solve(layer, *_normal_equations(layer, inputs, picks[k], want))
            out = layer.forward(inputs)  # the branch again, with the refitted weights (no hook: gated already)
            env[bn_node if bn_node is not None else node] = bn(out) if bn is not None else out

    with gating():
        handles = [layer.register_forward_pre_hook(fit(k)) for k, layer in fitted]
        try:
            with torch.no_grad():
                _Sums(net, graph, at_sum).run(x) if ends else net(x)
        finally:
            for h in handles:
                h.remove()
