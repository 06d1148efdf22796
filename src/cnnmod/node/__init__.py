"""The paper's module kind: masks over the source model's nodes (CI, TI, MC, MC-BLN, MC-BI) and a two-way head.
Importing it registers the kind ``node`` (:mod:`.kind`)."""

from . import kind  # noqa: F401 -- registers the kind
from .method import DecomposeSettings, decompose
from .module import Module

__all__ = ["DecomposeSettings", "Module", "decompose"]
