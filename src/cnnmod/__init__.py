"""cnnmod: decompose trained CNN classifiers into reusable, replaceable per-class modules."""

__version__ = "0.1.0"

from . import data  # noqa: E402
from .classifier import Classifier, load_model, save_model  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["Classifier", "UserError", "data", "load_model", "save_model", "__version__"]
