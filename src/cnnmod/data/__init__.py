"""Image data sets: loaders for the standard on-disk formats, a decode cache, and tensor transforms."""

from .dataset import ImageSet, parse_class_list
from .registry import NAMES, data_root_path, default_augment, info, load, split_spec
from .transforms import Augment, InputSpec, to_input

__all__ = ["ImageSet", "InputSpec", "Augment", "NAMES", "load", "info", "data_root_path", "default_augment",
           "split_spec", "to_input", "parse_class_list"]
