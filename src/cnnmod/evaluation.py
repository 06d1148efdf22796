"""Evaluating a model artifact on a data set's test split, with the checks that keep the result meaningful."""

from __future__ import annotations

import time
from pathlib import Path

from .classifier import Classifier, load_model
from .data import load, split_spec
from .data.dataset import ImageSet
from .errors import UserError
from .metrics import evaluate_classifier
from .runtime import pick_device


def test_set_for(clf: Classifier, data: str | None, data_root: str | None, resize: bool = False) -> ImageSet:
    """The test split a classifier is judged on: by default its own data set and classes.

    An explicit data set must have the model's class count; its images must have the model's input shape
    unless ``resize`` allows converting them.
    """
    spec = data or clf.dataset
    if not spec:
        raise UserError("the model does not record its data set; pass --data NAME")
    name, spec_classes = split_spec(spec)
    classes = spec_classes
    if classes is None and name == clf.dataset and clf.source_classes != list(range(len(clf.source_classes))):
        classes = clf.source_classes
    test = load(name, "test", data_root, classes)
    if test.num_classes != clf.num_classes:
        raise UserError(f"the model has {clf.num_classes} classes but {spec} has {test.num_classes}; "
                        "pick the matching data set or classes (e.g. --data NAME:0,3,7)")
    if test.input_shape != clf.spec.shape and not resize:
        raise UserError(f"the model takes {'x'.join(map(str, clf.spec.shape))} images but {spec} has "
                        f"{'x'.join(map(str, test.input_shape))}; pass --resize to convert them")
    return test


def evaluate_model_dir(model_dir: str | Path, data: str | None, data_root: str | None, device: str = "auto",
                       batch_size: int = 512, resize: bool = False) -> dict:
    clf = load_model(model_dir)
    test = test_set_for(clf, data, data_root, resize)
    started = time.perf_counter()
    report = evaluate_classifier(clf, test, pick_device(device), batch_size)
    return {"model": str(model_dir), "data": data or clf.dataset, **report,
            "seconds": round(time.perf_counter() - started, 3)}
