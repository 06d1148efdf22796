"""cnnmod: decompose trained CNN classifiers into reusable, replaceable per-class modules."""

__version__ = "0.1.0"

from . import data  # noqa: E402
from .classifier import Classifier, load_model, save_model  # noqa: E402
from .compose import Composition, compose  # noqa: E402
from .decompose import DecomposeSettings, decompose  # noqa: E402
from .errors import UserError  # noqa: E402
from .module import Module  # noqa: E402
from .store import load_module, load_modules, save_decomposition  # noqa: E402

__all__ = ["Classifier", "Composition", "DecomposeSettings", "Module", "UserError", "compose", "data", "decompose",
           "load_model", "load_module", "load_modules", "save_decomposition", "save_model", "__version__"]
