"""A trained classifier with what it needs to be used: input spec, class names, provenance.

``Classifier`` is an ``nn.Module`` whose ``forward`` takes normalised float input; ``prepare`` turns uint8
images of any size and channel count into that input. :mod:`cnnmod.models.folder` moves it to and from a model
artifact folder; :func:`split_for` finds the data it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import load, split_spec
from ..data.dataset import ImageSet
from ..data.transforms import InputSpec, to_input
from ..errors import UserError
from .preprocessing import check_preprocessing, values
from .reference import check_output, reference_of, trusting
from .registry import create, load_weights, resolve_arch


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, spec: InputSpec, class_names: list[str], arch: str = "custom",
                 arch_args: dict | None = None, dataset: str = "", source_classes: list[int] | None = None,
                 info: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.class_names = list(class_names)
        self.arch = arch
        self.arch_args = dict(arch_args or {})
        self.dataset = dataset
        self.source_classes = list(source_classes) if source_classes is not None else list(range(len(class_names)))
        self.info = dict(info or {})  # training settings, metrics, sha256 of the weights when loaded

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images -> this model's normalised input."""
        return to_input(images, self.spec)

    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def config(self) -> dict:
        return {"arch": {"name": self.arch, "args": self.arch_args}, "input": self.spec.to_dict(),
                "class_names": self.class_names, "dataset": self.dataset, "source_classes": self.source_classes,
                **self.info}


def wrap(net: nn.Module, *, data: ImageSet | None = None, mean: float | Sequence[float] | None = None,
         std: float | Sequence[float] | None = None, spec: InputSpec | None = None,
         class_names: list[str] | None = None, arch: str | None = None, arch_args: dict | None = None
         ) -> Classifier:
    """A user's trained network as a :class:`Classifier`, run as it was trained: ``mean`` and ``std`` are the
    normalisation it was trained with, in [0, 1] units (``mean=0, std=1``: ``ToTensor()`` alone; a ``Normalize``'s
    constants otherwise; one number or one per channel), on ``data``'s image shape; or ``spec``, all it expects
    (channels, size, mean/std, how other images are fitted). With ``data`` (its training split) the normalisation
    is checked (:func:`~cnnmod.models.preprocessing.check_preprocessing`): one clearly worse than a usual one, or
    none stated, is refused with the one that fits. Its class names default to ``data``'s; ``arch`` says how to
    rebuild it (a registered name or ``package.module:callable``, called with ``arch_args``; by default what a
    class registered with :func:`cnnmod.register_arch` recorded). Without an architecture it runs, but its folders
    cannot be saved (there would be no way to load them again)."""
    if spec is None and data is None:
        raise UserError("give the data the model was trained on (data=...) with its normalisation (mean=..., "
                        "std=...), or its input spec (spec=InputSpec(...))")
    if spec is not None and (mean is not None or std is not None):
        raise UserError("give the normalisation once: mean=/std= or spec=InputSpec(...), not both")
    if spec is None and (mean is None) != (std is None):
        raise UserError(f"give both «mean» and «std» (only «{'mean' if std is None else 'std'}» was given)")
    if spec is None and mean is not None:
        try:
            spec = InputSpec(*data.input_shape, values(mean, "mean"), values(std, "std"))
        except ValueError as e:
            raise UserError(f"the normalisation does not fit the data: {e}")
    names = list(class_names) if class_names is not None else (data.class_names if data is not None else None)
    if names is None:
        raise UserError("give the model's class names (class_names=[...]) or the data it was trained on")
    if data is not None:
        check_output(net, type(net).__name__, spec.shape if spec else data.input_shape, len(names))
        check_preprocessing(net, spec, data, "cnnmod.wrap(net, data=..., mean={mean}, std={std})")
    name, args = "custom", {}
    if arch is not None:
        with trusting(True):  # the caller named the code
            name, args, rebuilt = create(arch, dict(arch_args or {}), spec.shape, len(names))
        load_weights(rebuilt, net.state_dict(), name, f"the {type(net).__name__} given")
    elif (recorded := reference_of(net)) is not None:
        name, args = resolve_arch(recorded[0], recorded[1], spec.shape, len(names))
    source = data.source_classes if data is not None else None
    return Classifier(net, spec, names, name, args, data.name if data is not None else "", source)


def check_class_names(clf: Classifier, data: ImageSet) -> None:
    """A folder's classes are its folders' names: refuse one whose names are not the model's, in its order (the
    labels would silently mean other classes)."""
    if not data.name.startswith(("folder:", "imagenet")) or data.class_names == clf.class_names:
        return
    if clf.class_names == [str(i) for i in range(clf.num_classes)]:  # the model never knew its classes' names
        return
    differ = [(a, b) for a, b in zip(clf.class_names, data.class_names, strict=False) if a != b]
    first = f"; the first: the model's {differ[0][0]!r} is {differ[0][1]!r} there" if differ else ""
    raise UserError(f"the classes of {data.name} ({data.split}) differ from the model's{first}: name the class "
                    "folders as the model's classes (in its order), or give the data the model was trained on")


def test_set_for(clf: Classifier, data: str | None, data_root: str | None, resize: bool = False) -> ImageSet:
    """The test split a classifier is judged on: by default its own data set and classes."""
    return split_for(clf, data, data_root, "test", resize)


def split_for(clf: Classifier, data: str | None, data_root: str | None, split: str,
              resize: bool | None = False) -> ImageSet:
    """A split of the data a classifier was trained on: by default its own data set and classes.

    An explicit data set must have the model's class count; its images must have the model's input shape
    unless ``resize`` allows converting them (None: the caller has no such choice, and the error does not offer it).
    """
    spec = data or clf.dataset
    if not spec:
        raise UserError("the model does not record its data set; pass «data» NAME")
    name, spec_classes = split_spec(spec)
    classes = spec_classes
    if classes is None and name == clf.dataset and clf.source_classes != list(range(len(clf.source_classes))):
        classes = clf.source_classes
    test = load(name, split, data_root, classes)
    if test.num_classes != clf.num_classes:
        raise UserError(f"the model has {clf.num_classes} classes but {spec} has {test.num_classes}; "
                        "pick the matching data set or classes (e.g. --data NAME:0,3,7)")
    check_class_names(clf, test)
    own = name == split_spec(clf.dataset)[0] if clf.dataset else False  # trained on it, resized or not
    if test.input_shape != clf.spec.shape and not resize and not own:
        fix = "pass «resize» to convert them" if resize is not None else "give data of the model's input size"
        raise UserError(f"the model takes {'x'.join(map(str, clf.spec.shape))} images but {spec} has "
                        f"{'x'.join(map(str, test.input_shape))}; {fix}")
    return test


def as_classifier(model: nn.Module, data: ImageSet) -> Classifier:
    """A user's plain ``nn.Module`` is taken to have been trained on ``data``'s classes and normalisation (say
    otherwise with :func:`cnnmod.models.classifier.wrap`)."""
    if isinstance(model, Classifier):
        return model
    return wrap(model, data=data)


def check_data(clf: Classifier, data: ImageSet) -> None:
    if data.num_classes != clf.num_classes:
        raise UserError(f"the model has {clf.num_classes} classes but the data set {data.name} has "
                        f"{data.num_classes}; give the data the model was trained on (e.g. --data NAME:0,3,7)")
    check_class_names(clf, data)
    own = bool(clf.dataset) and split_spec(clf.dataset)[0] == split_spec(data.name)[0]  # resized in training
    if data.input_shape != clf.spec.shape and not own:
        raise UserError(f"the model takes {'x'.join(map(str, clf.spec.shape))} images but {data.name} has "
                        f"{'x'.join(map(str, data.input_shape))}; give the data the model was trained on")


def chosen_classes(clf: Classifier, classes: list[int] | None) -> list[int]:
    chosen = list(range(clf.num_classes)) if classes is None else list(classes)
    for c in chosen:
        if not 0 <= c < clf.num_classes:
            raise UserError(f"the model has no class {c}: its classes are 0..{clf.num_classes - 1}")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"the class list {chosen} names a class twice")
    return chosen
