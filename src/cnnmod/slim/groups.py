"""A channel group, the unit of slim pruning: channels that are cut together, and where they are computed and
read (:class:`~cnnmod.slim.channels.ChannelGroups` finds them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Reads = list[tuple[str, torch.Tensor, torch.Tensor]]  # (layer, its input or output indices, the channel each carries)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are cut together: the layers that compute them (``roots``, the first names the group), the
    observation points that carry them (``points``), how many (``channels``), the layers that read them
    (``consumers``) and that compute them (``outputs``), each as (layer, indices, the channel each index
    carries); ``unit``: "heads" or "mlp" for a transformer's unit group (:mod:`cnnmod.slim.units`), None for
    channels torch-pruning found."""

    roots: list[str]
    points: list[str]
    channels: int
    consumers: Reads
    outputs: Reads
    unit: str | None = None

    @property
    def root(self) -> str:
        return self.roots[0]
