"""The node kind's two walks over a network's graph (docs/method.md, "MC-BLN", "MC-BI"), both passing regions of
nodes through the op table (:mod:`cnnmod.core.ops`): marking nodes backwards from the head (MC-BLN), and the
liveness of nodes given the masks (MC-BI)."""

from __future__ import annotations

import torch

from ..core.graph import ModelGraph


def mark_back(graph: ModelGraph, region: torch.Tensor, delta: float, relative: bool = False) -> dict[str, torch.Tensor]:
    """MC-BLN: map marked head-input features back to the observation-point nodes they summarise.

    Returns, per observation point that was reached, the boolean nodes to switch off. Hidden dense layers
    are walked through first: a node of the layer below is marked when at least one node above is marked
    and its weights into the marked nodes are all <= -delta (with ``relative``, -delta times the root mean
    square of that layer's weights). Marks stop at the image, at constants and at the class layer.
    """
    off: dict[str, torch.Tensor] = {}
    work = [graph.head_region(region)]
    while work:
        node, reg = work.pop()
        if not bool(reg.any()) or node.op == "placeholder" or node.name not in graph.shapes:
            continue
        point = graph.point_by_node.get(node.name)
        if point is not None:
            off[point.name] = off.get(point.name, torch.zeros(point.shape, dtype=torch.bool)) | reg
            if point.kind == "linear":
                weight = graph.module(point.layer).weight.detach().cpu()
                limit = delta * float(weight.pow(2).mean().sqrt()) if relative else delta
                below = (weight[reg.reshape(-1)] <= -limit).all(dim=0)
                (src,) = graph.ops[point.node].inputs(graph.nodes[point.node])
                work.append((src, below.reshape(graph.shapes[src.name])))
            continue
        if node.op == "call_module" and node.target == graph.head.layer:
            continue
        work.extend(graph.ops[node.name].reads(graph, node, reg))
    return off

def needed(graph: ModelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MC-BI: for every observation point, the nodes whose value reaches the head given ``masks``.

    Liveness in reverse topological order, from the head's input: each node's needed region (what its
    consumers read of it, masked where it is an observation point) is passed to its inputs through the op
    table; a convolution reads an input node when it feeds a kept output node, pooling when a needed window
    covers it, a dense layer with any kept output reads all its inputs.
    """
    need: dict[str, torch.Tensor] = {}
    start, region = graph.head_region(torch.ones(graph.head_features, dtype=torch.bool))
    need[start.name] = region
    for node in reversed(list(graph.gm.graph.nodes)):
        reg = need.get(node.name)
        if reg is None or node.op == "placeholder":
            continue
        point = graph.point_by_node.get(node.name)
        if point is not None:
            reg = reg & masks[point.name]
        if not bool(reg.any()):
            continue
        for src, r in graph.ops[node.name].reads(graph, node, reg):
            if src.name in graph.shapes:
                need[src.name] = need[src.name] | r if src.name in need else r
    return {p.name: need.get(p.node, torch.zeros(p.shape, dtype=torch.bool)) for p in graph.points}
