"""The module contract (:class:`BinaryModule`) and its kinds: node-level (the paper's) and slim."""

from .base import BinaryModule, ClassRef
from .masked import Module
from .slim import SlimModule

__all__ = ["BinaryModule", "ClassRef", "Module", "SlimModule"]
