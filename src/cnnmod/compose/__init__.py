"""The composition contract (:class:`Composer`) and its kinds: voting (and merged node-level modules), merged
slim networks, fused slim networks of several models."""

from .base import Composer, vote
from .slim import FusedSlim, MergedSlim
from .voting import Composition, compose

__all__ = ["Composer", "Composition", "FusedSlim", "MergedSlim", "compose", "vote"]
