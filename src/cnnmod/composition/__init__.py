"""The composition contract (:class:`Composer`), voting (and merged node-level modules), calibration and head
fitting through the module contract, joint head refits, and evaluation of any composer."""

from .base import Composer, vote
from .voting import Composition, compose

__all__ = ["Composer", "Composition", "compose", "vote"]
