"""cnnmod: decompose trained CNN classifiers into reusable, replaceable per-class modules."""

__version__ = "0.1.0"

from . import data  # noqa: E402
from .composition import Composer, Composition, compose  # noqa: E402
from .data.torch_dataset import from_dataset  # noqa: E402
from .data.transforms import InputSpec  # noqa: E402
from .errors import UserError  # noqa: E402
from .io.store import load_composer, load_module, load_modules, save_decomposition  # noqa: E402
from .models.classifier import Classifier, wrap  # noqa: E402
from .models.folder import load_model, save_model  # noqa: E402
from .models.reference import register_arch, trusting  # noqa: E402
from .modules import BinaryModule  # noqa: E402
from .node import (  # noqa: E402
           DecomposeSettings,
           Module,  # noqa: E402
           decompose,
)
from .slim import SlimModule  # noqa: E402

__all__ = ["BinaryModule", "Classifier", "Composer", "Composition", "DecomposeSettings", "InputSpec", "Module",
           "SlimModule", "UserError", "compose", "data", "decompose", "from_dataset", "load_composer", "load_model",
           "load_module", "load_modules", "register_arch", "save_decomposition", "save_model", "trusting", "wrap",
           "__version__"]
