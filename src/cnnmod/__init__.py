"""cnnmod: decompose trained CNN classifiers into reusable, replaceable per-class modules.

The names below are imported on first use, so that ``import cnnmod`` (and ``cnnmod --version``, ``--help``) does
not import torch until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "decompose": "api", "compose": "api",
    "Composer": "composition", "Composition": "composition",
    "from_dataset": "data.torch_dataset", "InputSpec": "data.transforms", "UserError": "errors",
    "load_composer": "io.store", "load_module": "io.store", "load_modules": "io.store",
    "save_decomposition": "io.store", "export_onnx": "io.export",
    "Classifier": "models.classifier", "wrap": "models.classifier",
    "load_model": "models.folder", "save_model": "models.folder",
    "register_arch": "models.reference", "trusting": "models.reference",
    "BinaryModule": "modules", "DecomposeSettings": "node", "Module": "node",
    "SlimModule": "slim", "SlimSettings": "slim", "RECIPE_NAMES": "recipes",
    "evaluate": "api",
}
__all__ = sorted([*_EXPORTS, "data", "__version__"])


def __getattr__(name: str):
    if name == "data":
        return importlib.import_module(".data", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnnmod' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
