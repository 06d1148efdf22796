"""Slim compositions: slim modules of one model merged into one network (:class:`MergedSlim`, made by
:func:`merge_slim`), and merged networks of several models side by side (:class:`FusedSlim`)."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from ..composition.base import Composer
from ..core.attention import parse_heads
from ..core.calibrate import source_log_odds
from ..core.observe import class_order
from ..data.dataset import ImageSet
from ..data.transforms import InputSpec, to_input
from ..errors import UserError
from ..models.classifier import Classifier
from ..modules.base import ClassRef, base_dataset
from .channels import ChannelGroups, frozen_copy
from .config import SlimSettings
from .make import InputPools, source_info, source_margin
from .module import SlimModule
from .pruner import Margins, Pruner
from .schedule import prune


class MergedSlim(Composer):
    """Slim modules of one source model as one network: the union of their kept channels, BatchNorm statistics
    re-estimated on it, and one refitted head row per class (its margin, class c vs the rest). ``forward`` takes
    uint8 images and returns scores p_c (B, K)."""

    mode = "merged"

    def __init__(self, net: nn.Module, classifier: str, spec: InputSpec, concerned: list[int], source_info: dict,
                 removed: dict[str, list[int]], settings: dict, metrics: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.classifier_name = classifier
        self.spec = spec
        self.concerned = list(concerned)
        self.source_info = dict(source_info)
        self.removed = {k: list(v) for k, v in removed.items()}
        self.settings = dict(settings)
        self.metrics = dict(metrics or {})

    @property
    def refs(self) -> list[ClassRef]:
        info, dataset = self.source_info, base_dataset(self.source_info.get("dataset", ""))
        return [ClassRef(dataset, info["source_classes"][c], info["class_names"][c], c) for c in self.concerned]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def source_shas(self) -> list[str | None]:
        return [self.source_info.get("weights_sha256")] * len(self.concerned)

    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def kept_fractions(self) -> list[float]:
        return [self.metrics["params_fraction"]] * len(self.concerned)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(to_input(images, self.spec)))


class FusedSlim(Composer):
    """Merged slim networks of several source models side by side (``compose --mode fused``): one pass of each,
    each scoring its own classes, fitted against all of the composition's other classes (its own model's and
    the other models'). ``forward`` takes uint8 images and returns the scores p_c (B, K) of every class, in the
    order of its parts."""

    mode = "fused"

    def __init__(self, parts: list[MergedSlim]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @property
    def refs(self) -> list[ClassRef]:
        return [r for p in self.parts for r in p.refs]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.parts[0].input_shape

    @property
    def source_shas(self) -> list[str | None]:
        return [sha for p in self.parts for sha in p.source_shas]

    def params(self) -> int:
        return sum(p.params() for p in self.parts)

    def kept_fractions(self) -> list[float]:
        return [f for p in self.parts for f in p.kept_fractions()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(images) for p in self.parts], 1)


def merge_slim(modules: list[SlimModule], source: Classifier, data: ImageSet, settings: SlimSettings, *,
               held_per_class: int = 1000, foreign: list[ImageSet] | None = None,
               batch_size: int = 256) -> MergedSlim:
    """Merge slim modules of ``source`` into one network (the union of their kept channels) and refit every
    class's head row on it: class c against the composition's other classes (the composition's world: inputs of
    its classes, ``settings.samples`` of each from ``data``, the source's training split), to the source's p_c
    among them. With ``settings.size``, channels are then closed, as
    for a slim module (ranked by ``cost``), until the network holds at most that share of the model's
    parameters; with ``max_loss``, until the next step would put its top-1 among its classes more than that many
    points under the model's restricted to them, on ``held_per_class`` held-out inputs of each class
    (:class:`InputPools`; ``size`` is then a floor). ``foreign``: for a fused composition
    (:class:`cnnmod.slim.merged.FusedSlim`), the training images of the classes it takes from other models (one
    set per data set, restricted to those classes): ``samples`` of each of their classes are observed too, as
    inputs of none of this network's classes, so that its scores stay low on them (BatchNorm statistics still
    come from its own classes' inputs). The backbone is not trained."""
    if not modules:
        raise UserError("nothing to merge: no modules")
    sha = source.info.get("weights_sha256")
    if any(m.source_info.get("weights_sha256") != sha for m in modules):
        raise UserError("«mode» merged needs slim modules of one source model; these come from several")
    started = time.perf_counter()
    size, max_loss, samples, seed = settings.size, settings.max_loss, settings.samples, settings.seed
    # a merged network keeps several classes' channels, so each step weighs more of what they share: smaller
    # steps, over every observed input
    s = replace(settings.resolved(1.0), step=0.1, step_samples=None)
    s.check()
    heads = modules[0].settings.get("heads")
    frozen = frozen_copy(source.net, source.spec.shape, parse_heads(heads))
    graph, net, groups = frozen
    device = next(net.parameters()).device
    gates = union_gates(modules, groups, device)
    chosen = [m.concerned for m in modules]
    world = chosen if len(chosen) > 1 else list(range(data.num_classes))  # one class alone: against all
    pools = InputPools(source, data, seed)
    idx = pools.first(world, samples)
    x_obs = source.prepare(data.images[idx].to(device))
    targets = data.labels[idx].to(device)[:, None] == torch.tensor(chosen, device=device)[None, :]
    soft = torch.sigmoid(source_log_odds(net, x_obs, batch_size, world)[:, [world.index(c) for c in chosen]])
    own = x_obs.shape[0]
    for f in foreign or []:
        order = class_order(f.labels, f.num_classes, seed)
        x_obs = torch.cat([x_obs, source.prepare(f.images[torch.cat([o[:samples] for o in order])].to(device))])
    if x_obs.shape[0] > own:  # none of them is of this network's classes
        targets = torch.cat([targets, targets.new_zeros(x_obs.shape[0] - own, len(chosen))])
        soft = torch.cat([soft, soft.new_zeros(x_obs.shape[0] - own, len(chosen))])
    rows = [source_margin(graph.head.linear_map(net), c) for c in chosen]
    margins = Margins(x_obs, targets, soft, torch.stack([w for w, _ in rows]), torch.tensor([b for _, b in rows]),
                      bn_rows=own, binary=False)
    p = Pruner(source, s, margins, batch_size, frozen, gates)
    if max_loss is not None:
        held = pools.held_out(world, held_per_class)
        x_held, y_held = source.prepare(data.images[held].to(device)), data.labels[held]
        model_odds = source_log_odds(net, x_held, batch_size, world)[:, [world.index(c) for c in chosen]].cpu()

    def top1(z: torch.Tensor | None = None) -> float:
        return p.top1(x_held, y_held, chosen, z)

    pruning = size is not None or max_loss is not None
    p.refresh()  # a merged network's steps work on every observed input
    # the reference is the model restricted to the composition's classes: a union that already loses more than
    # max_loss against it is not pruned further
    start = top1(model_odds) if max_loss is not None else None
    history = prune(p, top1 if max_loss is not None else None, start) if pruning else []
    sliced = p.sliced(check=True)
    info = source_info(source)
    params = sum(q.numel() for q in sliced.parameters())
    held_metrics = {} if start is None else {"held_out_model_top1": start, "held_out_top1": top1(),
                                             "held_out_images": len(y_held), "held_out_from": pools.held_out_from}
    metrics = {**held_metrics, "params": params, "params_fraction": round(params / info["params"], 4),
               "kept_channels": p.kept_channels(),
               "channels": p.channels, "history": history, **p.layout()}
    recorded = {"granularity": "channel", "mode": "merged", "samples": samples, "seed": seed, "objective": "distill",
                "world": [info["source_classes"][c] for c in world],
                "foreign": [f"{f.name}:{','.join(map(str, f.source_classes))}" for f in foreign or []],
                "size": size, "max_loss": max_loss, "cost": s.cost, "multiple": s.multiple,
                "reconstruct": s.reconstruct, "rule": s.rule, "scale_epochs": s.scale_epochs, "scale_bn": s.scale_bn,
                "heads": heads, "seconds": round(time.perf_counter() - started, 3)}
    return MergedSlim(sliced, graph.head.sliced_layer, source.spec, chosen, info, p.removed(), recorded, metrics).eval()


def union_gates(modules: list[SlimModule], groups: ChannelGroups, device: torch.device) -> list[torch.Tensor]:
    """Per channel group of the source network, 1 for the channels any of ``modules`` keeps, else 0."""
    gates = []
    for g in groups.groups:
        gate = torch.zeros(g.channels, device=device)
        for m in modules:
            kept = torch.ones(g.channels, dtype=torch.bool)
            kept[m.removed.get(g.root, [])] = False
            gate[kept.to(device)] = 1.0
        gates.append(gate)
    return gates
