"""Making modules: the paper's masks and heads (:mod:`.paper`), their calibration and refits (:mod:`.fitting`),
and slim modules cut by channel pruning (:mod:`.slim`)."""

from .paper import DecomposeSettings, decompose
from .slim import SlimSettings, merge_slim, slim_module, slim_modules

__all__ = ["DecomposeSettings", "SlimSettings", "decompose", "merge_slim", "slim_module", "slim_modules"]
