"""Slim modules: a module cut by channel pruning into a physically smaller network, no retraining; merged and
fused slim compositions. The engine: :mod:`.config` (settings and recipes), :mod:`.importance`, :mod:`.pruner`,
:mod:`.schedule`, :mod:`.recovery`; :mod:`.make` and :mod:`.merged` build modules and compositions with it.
Importing it registers the module kind ``channel`` and the composition kinds ``merged-network`` and
``fused-networks`` (:mod:`.kind`)."""

from . import kind  # noqa: F401 -- registers the kinds
from .config import RECIPES, SlimSettings, merged_settings, slim_settings
from .importance import Importance, register_importance
from .make import ModuleMaker, slim_module, slim_modules
from .merged import FusedSlim, MergedSlim, merge_slim
from .module import SlimModule

__all__ = ["RECIPES", "FusedSlim", "Importance", "MergedSlim", "ModuleMaker", "SlimModule", "SlimSettings",
           "merge_slim", "merged_settings", "register_importance", "slim_settings", "slim_module", "slim_modules"]
