"""Channel groups of a network (docs/method.md, "Slim modules"): which channels are cut together (coupled through
residual additions: torch-pruning's dependency graph), gating them at the layers that read them, slicing a network
physically to the open channels, and what each channel costs in parameters and FLOPs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from ..core.attention import kept_whole
from ..core.averaged_heads import slicing_form
from ..core.cost import count_flops
from ..core.graph import Head, ModelGraph
from ..core.layers import copied
from ..errors import UserError
from .groups import ChannelGroup
from .units import Unit, find_chains, find_units


def _dependency_graph(net: nn.Module, input_shape: tuple[int, int, int]):
    """torch-pruning's dependency graph of ``net`` (traced through autograd, so parameters must want gradients
    while it is built; their flags are restored). In-place activations are made out-of-place first (``net`` is
    always a copy): an in-place ReLU right after a convolution hides the convolution from the trace."""
    tp = _tp()
    for m in net.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    flags = [p.requires_grad for p in net.parameters()]
    device = next(net.parameters()).device
    try:
        for p in net.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on parameters it finds outside layers (layer scales)
            return tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, *input_shape,
                                                                                         device=device))
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _tp():
    try:
        import torch_pruning
    except ImportError:
        raise UserError("slim modules need torch-pruning: pip install torch-pruning")
    return torch_pruning


class ChannelGroups:
    """Coupled channel groups of a network and the observation points that carry each group's channels; in a
    transformer, its attention heads and MLP hidden units (:mod:`cnnmod.slim.units`), the residual width left
    whole. ``units``: the unit groups by root, as :func:`slice_network` takes them."""

    def __init__(self, net: nn.Module, graph: ModelGraph, input_shape: tuple[int, int, int]) -> None:
        self.input_shape = input_shape
        self.units: dict[str, Unit] = find_units(graph)
        self.groups: list[ChannelGroup] = []
        self.left_out: list[tuple[str, str]] = []
        self.whole: dict[str, str] = {**kept_whole(net), **graph.untraced}  # layers kept as they are, with why
        self.chains: list[str] = []  # roots of chains cnnmod slices itself (where torch-pruning cannot trace)
        if not any(u.kind == "heads" for u in self.units.values()):
            self.groups = self._traced(net, graph)
        self.groups += [u.group() for u in self.units.values()]
        self.unsliceable = self.left_out + self._probe(net, graph)
        if not self.groups:
            reason = "; ".join(f"{layer}: {why}" for layer, why in self.unsliceable[:2])
            raise UserError(f"{type(net).__name__} has no channels that torch-pruning can slice"
                            f"{' (' + reason + ')' if reason else ''}; use «granularity» node")

    def _traced(self, net: nn.Module, graph: ModelGraph) -> list[ChannelGroup]:
        """The channel groups torch-pruning's dependency graph finds (those of an MLP's hidden units aside: the
        unit groups slice them). A network it cannot trace has none where it has unit groups."""
        classifier = net.get_submodule(graph.head.layer)
        try:
            dg = _dependency_graph(net, input_shape=self.input_shape)
            found = list(dg.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]))
        except Exception as e:  # noqa: BLE001 - torch-pruning's failures all mean the same to the user
            self.chains = list(chains := find_chains(graph))
            self.units.update(chains)
            if self.units:
                return []
            raise UserError(f"torch-pruning cannot trace {type(net).__name__} to slice it ({str(e)[:120]}); "
                            "use «granularity» node")
        names = {m: n for n, m in net.named_modules()}
        layer_points = {p.layer: p for p in graph.points}
        groups = []
        for group in found:
            roots = [names[d.target.module] for d, _ in group
                     if d.handler.__name__ == "prune_out_channels" and d.target.module is not classifier
                     and isinstance(d.target.module, (nn.Conv2d, nn.Linear))]
            points = [layer_points[r] for r in roots if r in layer_points]
            if not points or any(r in self.units for r in roots):
                continue
            norms = [names[d.target.module] for d, _ in group if isinstance(d.target.module, _NORMS)]
            if norms:  # a channel's value there depends on every other channel's: gating is not slicing
                self.left_out.append((roots[0], f"normalised over its channels by {norms[0]} (LayerNorm)"))
                continue
            channels = points[0].shape[0] if points[0].kind == "conv" else points[0].shape[-1]
            reads = _consumers(dg, group, names, channels)
            computes = _consumers(dg, group, names, channels, "prune_out_channels", _COMPUTES)
            groups.append(ChannelGroup(roots, [p.name for p in points], channels, reads, computes))
        return groups

    def _probe(self, net: nn.Module, graph: ModelGraph) -> list[tuple[str, str]]:
        """Cut one channel of every group and compare the sliced network with the gated one; groups that fail
        (an operation that depends on the channel count: a grouped convolution, a reshape to fixed channels, a
        channel shuffle) are kept whole. Returns (layer, reason) for each group left out."""
        w, b = graph.head.linear_map(net)
        device = w.device
        x = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(device)
        was_training = net.training
        net.eval()
        sliceable, left_out = [], []
        for group in self.groups:
            if group.channels < 2:
                continue
            gate = torch.ones(group.channels, device=device)
            gate[0] = 0.0
            root = group.root
            try:  # this group gated alone: another group's failure is that group's
                with torch.no_grad():
                    with gated(net, graph, SimpleNamespace(groups=[group]), [gate]):
                        expected = classifier_input(net, graph.head, lambda: net(x)) @ w.T + b
                    got = slice_network(net, self.input_shape, {root: [0]}, graph.head, w, b,
                                        units=self.units)(x)
                gap = float((got - expected).abs().max())
                if gap > 1e-3 * (float(expected.abs().max()) + 1.0):
                    left_out.append((root, f"the sliced network differs by {gap:.2g}"))
                    continue
            except Exception as e:  # noqa: BLE001 - any failure of a cut channel means the group stays whole
                left_out.append((root, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
                continue
            sliceable.append(group)
        net.train(was_training)
        self.groups = sliceable
        return left_out


_NORMS = (nn.LayerNorm, nn.GroupNorm)  # normalise over channels: a group through one is left whole
_COMPUTES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)  # layers whose outputs a narrowed copy maps back


def _reads(group, handler: str = "prune_in_channels",
           kinds: type | tuple = (nn.Conv2d, nn.Linear)) -> dict[nn.Module, list[int]]:
    """Per layer that reads a group's channels: its input indices that the group's pruning would cut (with
    ``handler`` "prune_out_channels": per layer that computes them, its output indices)."""
    out: dict[nn.Module, list[int]] = {}
    for dep, idxs in group:
        module = dep.target.module
        if dep.handler.__name__ == handler and isinstance(module, kinds):
            out.setdefault(module, []).extend(int(i) for i in idxs)
    return out


def _consumers(dg, group, names: dict, channels: int, handler: str = "prune_in_channels",
               kinds: type | tuple = (nn.Conv2d, nn.Linear)) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The layers that read a group's channels, as slicing cuts them: (layer, its input indices, the group channel
    each one carries). Where a layer reads each channel once, torch-pruning lists its indices in the order of the
    group's channels; where it reads some more than once (a flatten spreads a channel over several features, a
    concatenation carries it twice), each channel's indices are asked for one by one. With ``handler``
    "prune_out_channels" and ``kinds`` :data:`_COMPUTES`: the layers that compute the channels, with their output
    indices."""
    full = _reads(group, handler, kinds)
    root_item = next(d for d, _ in group if d.handler.__name__ == "prune_out_channels")
    per_channel: list[dict[nn.Module, list[int]]] | None = None
    result = []
    for module, idxs in full.items():
        idxs = sorted(set(idxs)) if len(set(idxs)) != len(idxs) else idxs
        if len(idxs) == channels:
            index, root = torch.tensor(idxs), torch.arange(channels)
        else:
            if per_channel is None:
                target, cut = root_item.target.module, root_item.handler
                per_channel = [_reads(dg.get_pruning_group(target, cut, idxs=[j]), handler, kinds)
                               for j in range(channels)]
            pairs = [(i, j) for j, reads in enumerate(per_channel) for i in reads.get(module, [])]
            index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            root = torch.tensor([j for _, j in pairs], dtype=torch.long)
        result.append((names[module], index, root))
    return result


@contextmanager
def gated(net: nn.Module, graph: ModelGraph, groups: ChannelGroups, gates: list[torch.Tensor]) -> Iterator[None]:
    """Context: ``net`` as slicing would leave it with the closed channels cut: each group's gate multiplied into
    the inputs of the layers that read its channels (the classifier among them), so that whatever lies between
    (BatchNorm, additions, concatenation) computes as before and a closed channel is simply not read. A gate of
    shape (B, C) instead of (C,) is a gate per input of a batch of B: the gradient of a loss summed over the batch
    with respect to row n is then input n's own (:meth:`cnnmod.slim.pruner.Pruner.fisher`)."""
    by_layer: dict[str, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
    for g, group in enumerate(groups.groups):
        for layer, index, root in group.consumers:
            by_layer.setdefault(layer, []).append((index, g, root))

    # then each layer's multiplier is made once, not per batch
    constant = not any(g.requires_grad or g.dim() > 1 for g in gates)
    made: dict[tuple, torch.Tensor] = {}

    def hook(layer: str):
        def apply(m, inputs):
            x = inputs[0]
            last = isinstance(m, nn.Linear)  # a linear layer reads features last ((B, tokens, F) too)
            width = x.shape[-1] if last else x.shape[1]
            key = (layer, x.shape, x.device, x.dtype)
            mult = made.get(key) if constant else None
            if mult is None:
                per_input = by_layer[layer] and gates[by_layer[layer][0][1]].dim() == 2
                mult = torch.ones(*((x.shape[0],) if per_input else ()), width, device=x.device, dtype=x.dtype)
                for index, g, root in by_layer[layer]:
                    gate = gates[g][..., root.to(x.device)].to(x.dtype)
                    if per_input and gate.shape[0] != x.shape[0]:  # a layer run on windows of each input, in order
                        if x.shape[0] % gate.shape[0]:
                            raise UserError(f"layer {layer!r} reads a batch of {x.shape[0]} rows for {gate.shape[0]} "
                                            "inputs; cnnmod cannot tell which rows are which input's")
                        gate = gate.repeat_interleave(x.shape[0] // gate.shape[0], dim=0)
                    mult = mult.index_copy(-1, index.to(x.device), gate)
                rest = [1] * (x.dim() - 2)
                mult = mult.view(x.shape[0] if per_input else 1, *rest, -1) if last else \
                    mult.view(x.shape[0] if per_input else 1, -1, *rest)
                if constant:
                    made[key] = mult
            return (x * mult, *inputs[1:])
        return apply

    handles = [net.get_submodule(layer).register_forward_pre_hook(hook(layer)) for layer in by_layer]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fold_gates(net: nn.Module, graph: ModelGraph, groups: ChannelGroups,
               gates: list[torch.Tensor]) -> tuple[nn.Module, torch.Tensor]:
    """What :func:`gated` computes, as plain weights: a copy of ``net`` whose layers that read a group's channels
    have each input channel's weights multiplied by its gate (a convolution and a linear layer are linear in each
    input channel), and the multiplier of each of the head's input features (the classifier reads gated features:
    fold it into the head's columns). Closed channels (gate 0) are left to slicing."""
    folded = copied(net)
    columns = torch.ones(graph.head.linear_map(net)[0].shape[1])
    with torch.no_grad():
        for g, group in enumerate(groups.groups):
            for layer, index, root in group.consumers:
                scale = gates[g].detach()[root].to(torch.float32)
                if layer == graph.head.layer and graph.head.reads_input:
                    columns[index] = scale.cpu()
                    continue
                module = folded.get_submodule(layer)
                weight = module.weight
                scale = scale.to(weight.device, weight.dtype)
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    per_in, per_out = weight.shape[1], module.out_channels // module.groups
                    for i, c in zip(index.tolist(), scale, strict=True):
                        first = (i // per_in) * per_out
                        weight[first:first + per_out, i % per_in] *= c
                else:  # Conv2d (groups 1) or Linear: dimension 1 is the input channel
                    shape = (1, -1) + (1,) * (weight.dim() - 2)
                    weight[:, index.to(weight.device)] *= scale.view(shape)
    return folded, columns


def classifier_input(net: nn.Module, head: Head, fn) -> torch.Tensor:
    """The head's (B, F) features in the forward pass ``fn`` runs."""
    with head.capture(net) as captured:
        fn()
    return captured["features"]


def reestimate_bn(net: nn.Module, run, one_batch: bool = False) -> bool:
    """Recompute every BatchNorm's running statistics from scratch on the data ``run`` feeds (weights frozen).

    With ``one_batch`` (``run`` feeds a single batch), each layer keeps the variance it normalised that batch by
    (the biased one, where PyTorch stores the unbiased, larger by n / (n - 1) for n values per channel): the
    pass's outputs are then exactly what the network computes in eval mode afterwards, so one pass gives both
    the statistics and the outputs they make. Returns whether they are: False when some layer ran more than once
    (more than one batch, or a BatchNorm the network uses twice), whose statistics then average its runs as
    without ``one_batch``."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return True
    saved = [(m.momentum, m.training) for m in bns]
    seen: dict[nn.Module, list[int]] = {}

    def count(m, inputs):
        seen.setdefault(m, []).append(inputs[0].numel() // inputs[0].shape[1])
    handles = [m.register_forward_pre_hook(count) for m in bns] if one_batch else []
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            run()
            exact = one_batch and all(len(n) == 1 for n in seen.values())
            if exact:
                for m, (n,) in seen.items():
                    if n > 1 and m.running_var is not None:
                        m.running_var.mul_((n - 1) / n)
    finally:
        for h in handles:
            h.remove()
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
    return exact


def slice_network(net: nn.Module, input_shape: tuple[int, int, int], removed: dict[str, list[int]],
                  head: Head, head_w: torch.Tensor | None, head_b: torch.Tensor | None,
                  outputs: int = 2, units: dict[str, Unit] | None = None) -> nn.Module:
    """A copy of ``net`` without the removed channels (coupled layers cut together; the groups of ``units``, by
    their roots, cut by the units themselves), its classifier replaced by an ``nn.Linear`` of ``head_w``'s rows
    (over the source's head features; the columns of the features that survive are kept), or of ``outputs`` rows,
    left to be loaded, when none are given."""
    sliced = copied(net).eval()
    device = next(sliced.parameters()).device
    head.tag(sliced)  # the head's first row numbers its input features, to read off which survive
    units = units or {}
    for root, idxs in removed.items():
        if idxs and root in units:
            units[root].cut(sliced, idxs)
    traced = {root: idxs for root, idxs in removed.items() if idxs and root not in units}
    if traced:
        _slice_traced(sliced, input_shape, traced, type(net).__name__)
    kept = head.kept(sliced)
    linear = nn.Linear(kept.numel(), head_w.shape[0] if head_w is not None else outputs).to(device)
    if head_w is not None and head_b is not None:
        with torch.no_grad():
            linear.weight.copy_(head_w[:, kept.to(head_w.device)].to(device))
            linear.bias.copy_(head_b.to(device))
    return head.replace(sliced, linear)


def _slice_traced(sliced: nn.Module, input_shape: tuple[int, int, int], removed: dict[str, list[int]],
                  name: str) -> None:
    """``sliced`` (in place) without the ``removed`` channels of torch-pruning's groups."""
    tp = _tp()
    dg = _dependency_graph(sliced, input_shape)
    for root, idxs in removed.items():
        layer = sliced.get_submodule(root)
        handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        try:
            dg.get_pruning_group(layer, handler, idxs=list(idxs)).prune()
        except Exception as e:  # noqa: BLE001 - whatever torch-pruning trips on means the same to the user
            raise UserError(f"torch-pruning cannot slice {name} at layer {root!r} "
                            f"({type(e).__name__}: {str(e)[:100]}); use «granularity» node")


def verify_sliced(sliced: nn.Module, x: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """A one-line error when the sliced network fails on ``x`` (naming the layer after which it fails) or
    computes other outputs than ``expected`` (what the gated network computes)."""
    done: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: done.append(n))
               for n, m in sliced.named_modules() if n]
    try:
        with torch.no_grad():
            out = sliced(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the same to the user
        where = f"after layer {done[-1]!r}" if done else "at its first layer"
        raise UserError(f"torch-pruning cannot slice {name}: with channels cut, it fails {where} "
                        f"({str(e)[:120]}), where an operation depends on the channel count; "
                        "use «granularity» node")
    finally:
        for h in handles:
            h.remove()
    gap = float((out - expected).abs().max())
    if gap > 1e-2 * (float(expected.abs().max()) + 1.0):  # loose enough for TF32 on a GPU
        raise UserError(f"torch-pruning cannot slice {name} faithfully: the sliced network's outputs differ from "
                        f"the gated model's by {gap:.3g}; use «granularity» node")


def _width(layer: nn.Module, side: str) -> int:
    """How many channels (features) a convolution, linear or BatchNorm layer reads (``side`` "in") or computes
    ("out")."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return layer.num_features
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "in" else layer.out_features
    return layer.in_channels if side == "in" else layer.out_channels


def narrowed(groups: ChannelGroups, net: nn.Module,
             gates: list[torch.Tensor]) -> tuple[ChannelGroups, dict[str, dict[str, torch.Tensor]]]:
    """``groups`` as they are in ``net`` sliced to the open channels of ``gates`` (:func:`slice_network` keeps
    the order): every group's channels numbered among its open ones, every layer's inputs and outputs among
    those that stay. Also, under "consumers" (inputs) and "outputs", per layer that loses some: which stay (a
    mask over ``net``'s)."""
    keep = [g.detach().cpu() > 0 for g in gates]
    rank = [k.long().cumsum(0) - 1 for k in keep]
    result: list[dict] = [{} for _ in groups.groups]
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for key, side in (("consumers", "in"), ("outputs", "out")):
        mask: dict[str, torch.Tensor] = {}
        for g, group in enumerate(groups.groups):
            for layer, index, root in getattr(group, key):
                m = mask.setdefault(layer, torch.ones(_width(net.get_submodule(layer), side), dtype=torch.bool))
                m[index[~keep[g][root]]] = False
        position = {layer: m.long().cumsum(0) - 1 for layer, m in mask.items()}
        for g, group in enumerate(groups.groups):
            result[g][key] = [(layer, position[layer][index[keep[g][root]]], rank[g][root[keep[g][root]]])
                              for layer, index, root in getattr(group, key)]
        masks[key] = {layer: m for layer, m in mask.items() if not bool(m.all())}
    view = groups.__class__.__new__(groups.__class__)  # what a channel costs depends on the network it is cut from
    view.__dict__.update({k: v for k, v in groups.__dict__.items() if k != "_costs"})
    view.groups = [replace(g, channels=int(k.sum()), **r) for g, k, r in zip(groups.groups, keep, result, strict=True)]
    return view, masks


def closed_channels(groups: ChannelGroups, gates: list[torch.Tensor]) -> dict[str, list[int]]:
    """The closed channels of every group, by the group's first root layer (what slicing takes)."""
    return {g.root: [int(j) for j in torch.nonzero(gate == 0).flatten()]
            for g, gate in zip(groups.groups, gates, strict=True)}


def frozen_copy(source: nn.Module, input_shape: tuple[int, int, int],
                heads: dict[str, int] | None = None) -> tuple[ModelGraph, nn.Module, ChannelGroups]:
    """The graph of network ``source`` (in the form slicing keeps, :func:`cnnmod.core.averaged_heads.slicing_form`:
    attention canonical, averaged heads one; ``heads``: head counts by layer, where a layer does not record its
    own), a frozen copy of it to gate and re-estimate, and its channel groups."""
    net = slicing_form(copied(source).eval(), heads, input_shape).requires_grad_(False)
    graph = ModelGraph(net, input_shape)
    return graph, net, ChannelGroups(net, graph, input_shape)


def sliced_cost(net: nn.Module, input_shape: tuple[int, int, int], removed: dict[str, list[int]], head: Head,
                what: str, units: dict[str, Unit] | None = None) -> float:
    """Parameters, or FLOPs per image, of ``net`` with the ``removed`` channels sliced away."""
    sliced = slice_network(net, input_shape, removed, head, None, None, units=units)
    if what == "params":
        return float(sum(p.numel() for p in sliced.parameters()))
    return float(count_flops(sliced.eval(), torch.zeros(1, *input_shape, device=next(net.parameters()).device)))


def cost_per_channel(net: nn.Module, groups: ChannelGroups, input_shape: tuple[int, int, int], head: Head,
                      what: str) -> list[float]:
    """Per channel group: the parameters (or FLOPs per image) that slicing one of its channels saves, in all the
    coupled layers (computed once per ``groups``: they depend on the network's shapes only)."""
    memo = groups.__dict__.setdefault("_costs", {})
    if (what, input_shape) not in memo:
        whole = sliced_cost(net, input_shape, {}, head, what)
        memo[what, input_shape] = [whole - sliced_cost(net, input_shape, {g.root: [0]}, head, what,
                                                       groups.units) for g in groups.groups]
    return memo[what, input_shape]
