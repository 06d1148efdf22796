"""The module contract (:class:`BinaryModule`), the table of module kinds, and the batched runner over any kind."""

from .base import BinaryModule, ClassRef

__all__ = ["BinaryModule", "ClassRef"]
