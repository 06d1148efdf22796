"""Slim modules: a module cut by channel pruning into a physically smaller network, no retraining; merged and
fused slim compositions."""

from .make import SlimSettings, merge_slim, slim_module, slim_modules
from .merged import FusedSlim, MergedSlim
from .module import SlimModule

__all__ = ["FusedSlim", "MergedSlim", "SlimModule", "SlimSettings", "merge_slim", "slim_module", "slim_modules"]
