"""Evaluating a model artifact on a data set's test split, with the checks that keep the result meaningful."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .artifacts import read_config
from .classifier import Classifier, load_model
from .data import load, split_spec
from .data.dataset import ImageSet
from .errors import UserError
from .metrics import accuracy_report, evaluate_classifier, predict_scores
from .runtime import pick_device


def test_set_for(clf: Classifier, data: str | None, data_root: str | None, resize: bool = False) -> ImageSet:
    """The test split a classifier is judged on: by default its own data set and classes."""
    return split_for(clf, data, data_root, "test", resize)


def split_for(clf: Classifier, data: str | None, data_root: str | None, split: str, resize: bool = False) -> ImageSet:
    """A split of the data a classifier was trained on: by default its own data set and classes.

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
    test = load(name, split, data_root, classes)
    if test.num_classes != clf.num_classes:
        raise UserError(f"the model has {clf.num_classes} classes but {spec} has {test.num_classes}; "
                        "pick the matching data set or classes (e.g. --data NAME:0,3,7)")
    own = name == split_spec(clf.dataset)[0] if clf.dataset else False  # trained on it, resized or not
    if test.input_shape != clf.spec.shape and not resize and not own:
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


def binary_report(scores: torch.Tensor, labels: torch.Tensor, column: int) -> dict:
    """A module's own task on a test set: does it vote "mine" (p_c > 0.5) exactly for its class's images?"""
    votes, mine = scores[:, column] > 0.5, labels == column
    pos, neg = int(mine.sum()), int((~mine).sum())
    return {"binary_accuracy": round(100.0 * float((votes == mine).float().mean()), 4) if labels.numel() else None,
            "true_positive_rate": round(100.0 * float(votes[mine].float().mean()), 4) if pos else None,
            "true_negative_rate": round(100.0 * float((~votes[~mine]).float().mean()), 4) if neg else None}


def evaluate_modules(modules: list, test: ImageSet, device: torch.device, batch_size: int = 512,
                     calibration: str = "none", source: Classifier | None = None, mode: str = "vote",
                     composition=None) -> dict:
    """Model vs the composition of ``modules`` (all of one source model) on ``test``, whose labels are the
    modules' positions. The model is scored on the same classes (its logits restricted to them). A prebuilt
    ``composition`` (uint8 images -> scores, e.g. a merged slim network) replaces composing ``modules``."""
    from .compose import compose
    from .module import pairwise_jaccard

    source = (source or modules[0].source).to(device).eval()
    columns = torch.tensor([m.concerned for m in modules])
    model_scores = predict_scores(lambda x: source(x)[:, columns.to(x.device)], source.prepare, test.images,
                                  device, batch_size)
    if composition is None:
        composition = compose(modules, calibration=calibration, mode=mode)
    composition = composition.to(device).eval()
    started = time.perf_counter()
    composed_scores = predict_scores(composition, lambda x: x, test.images, device,
                                     max(8, batch_size // getattr(composition, "max_group", 1)))
    composed_seconds = time.perf_counter() - started
    model = accuracy_report(model_scores, test.labels, test.class_names)
    composed = accuracy_report(composed_scores, test.labels, test.class_names)
    per_class = []
    for i, m in enumerate(modules):
        per_class.append({"class": m.concerned, "name": m.class_name, "count": model["per_class"][i]["count"],
                          "model_top1": model["per_class"][i]["top1"],
                          "composed_top1": composed["per_class"][i]["top1"],
                          "kept_fraction": round(m.kept_fraction(), 6),
                          **binary_report(composed_scores, test.labels, i)})
    kept = [m.kept_fraction() for m in modules]
    pairwise = pairwise_jaccard(modules) if all(hasattr(m, "masks") for m in modules) else None
    return {"model_top1": model["top1"], "model_top5": model["top5"],
            "composed_top1": composed["top1"], "composed_top5": composed["top5"],
            "decomposition_cost_top1_pp": round(composed["top1"] - model["top1"], 4),
            "decomposition_cost_top5_pp": round(composed["top5"] - model["top5"], 4),
            "jaccard_model_mean": round(sum(kept) / len(kept), 6),
            "jaccard_pairwise_mean": round(pairwise, 6) if pairwise is not None else None,
            "test_images": len(test), "composed_seconds": round(composed_seconds, 3), "per_class": per_class}


def costs(modules: list, images: torch.Tensor, per_module: bool, calibration: str = "none",
          source: Classifier | None = None, mode: str = "vote") -> dict:
    """Parameters, FLOPs and latency: of the composition as a whole and, with ``per_module``, the mean over the
    modules (each against its source model)."""
    from .compose import compose
    from .cost import cost_report

    out = {"composition": cost_report(compose(modules, calibration=calibration, mode=mode), images, source=source)}
    if per_module:
        reports = [cost_report(m, images, source=source) for m in modules]
        out["module_mean"] = {k: round(sum(r[k] for r in reports) / len(reports), 4) for k in reports[0]}
    return out


def evaluate_dir(paths: list[str | Path], data: str | None, data_root: str | None, device: str = "auto",
                 batch_size: int = 512, calibration: str | None = None, cost: bool = True,
                 latency_batch: int = 256, mode: str | None = None) -> dict:
    """``cnnmod evaluate``: decomposition folders or module folders of one source model, on its test set."""
    from .module import Module
    from .store import composition_setting, load_modules, slim_composition

    started = time.perf_counter()
    dev = pick_device(device)
    whole = slim_composition(paths)
    if whole is not None:
        evaluate = evaluate_fused_slim if whole == "fused" else evaluate_merged_slim
        return evaluate(paths[0], data, data_root, dev, batch_size, cost, latency_batch, started)
    modules = load_modules(paths, dev)
    calibration = calibration or composition_setting(paths, "calibration", "none")  # else the paper's scores
    mode = mode or composition_setting(paths, "mode", "vote")
    slim = [m for m in modules if not isinstance(m, Module)]
    sources = {id(m.source) for m in modules if isinstance(m, Module)}
    source = modules[0].source if not slim else None
    if slim and not sources and len(paths) == 1:  # a slim decomposition: its folder holds the source model
        from .store import load_source_of

        source = load_source_of(paths[0], dev)
    if len(sources) > 1 or source is None:
        if data is not None:
            raise UserError("--data applies to modules of one model; a composition across models is evaluated on "
                            "each class's own data set")
        report = evaluate_composition(modules, data_root, dev, batch_size, calibration=calibration, mode=mode)
        if cost:
            images = composition_test_sets(modules, data_root)[0][0].images[:latency_batch].to(dev)
            report["cost"] = costs(modules, images, per_module=False, calibration=calibration, mode=mode)
        return {"paths": [str(p) for p in paths], "modules": len(modules), "calibration": calibration,
                "mode": mode, **report,
                "seconds": round(time.perf_counter() - started, 3)}
    clf = source
    test = test_set_for(clf, data, data_root).subset([m.concerned for m in modules])
    report = evaluate_modules(modules, test, dev, batch_size, calibration, source=clf, mode=mode)
    if cost:
        whole = any(read_config(p)["kind"] == "composition" for p in paths)
        report["cost"] = costs(modules, test.images[:latency_batch].to(dev), per_module=not whole,
                               calibration=calibration, source=clf, mode=mode)
    return {"paths": [str(p) for p in paths], "data": data or clf.dataset,
            "variant": modules[0].settings.get("variant", modules[0].settings.get("granularity")),
            "modules": len(modules), "calibration": calibration, "mode": mode,
            **report,
            "seconds": round(time.perf_counter() - started, 3)}


def composition_test_sets(modules: list, data_root: str | None, per_class: int | None = None
                          ) -> list[tuple[ImageSet, torch.Tensor]]:
    """The test images of a composition's classes, one chunk per data set, each with its labels mapped to the
    composition's positions (at most ``per_class`` images of each class, in test-set order, when given)."""
    from .compose import base_dataset

    chunks = []
    datasets = list(dict.fromkeys(base_dataset(m) for m in modules))
    for name in datasets:
        positions = [i for i, m in enumerate(modules) if base_dataset(m) == name]
        test = load(name, "test", data_root).subset([modules[i].source_class for i in positions])
        if per_class is not None:
            test = test.first_per_class(per_class)
        chunks.append((test, torch.tensor(positions)[test.labels]))
    return chunks


def evaluate_composition(modules: list, data_root: str | None, device: torch.device, batch_size: int = 512,
                         per_class: int | None = None, calibration: str = "none", mode: str = "vote",
                         cache: dict | None = None, composition=None) -> dict:
    """A composition of modules from any models: top-1, top-5 and per-class accuracy on the union of its classes'
    test images, each from its own data set.

    A voting composition's scores are its modules' scores side by side; given a ``cache`` (a dict kept by the
    caller), each module's scores on each test chunk are computed once and reused by later compositions that
    hold the same module object (a study evaluates many compositions that share most of their modules). A
    prebuilt ``composition`` (uint8 images -> scores of ``modules``' classes, e.g. a fused slim network)
    replaces composing ``modules``."""
    from .compose import compose, qualified_name

    if composition is None:
        composition = compose(modules, calibration=calibration, mode=mode)
    composition = composition.to(device).eval()
    scores, labels = [], []
    started = time.perf_counter()
    for test, mapped in composition_test_sets(modules, data_root, per_class):
        if cache is None or mode != "vote":
            scores.append(predict_scores(composition, lambda x: x, test.images, device,
                                         max(8, batch_size // getattr(composition, "max_group", 1))))
        else:
            columns = []
            for m in modules:
                key = (id(m), calibration, test.name, tuple(test.source_classes), per_class)
                if key not in cache:  # the module is kept with its scores, so its id is not reused
                    alone = compose([m], calibration=calibration).to(device).eval()
                    cache[key] = (m, predict_scores(alone, lambda x: x, test.images, device, batch_size)[:, 0])
                columns.append(cache[key][1])
            scores.append(torch.stack(columns, 1))
        labels.append(mapped)
    composed_seconds = time.perf_counter() - started
    scores_all, labels_all = torch.cat(scores), torch.cat(labels)
    names = [qualified_name(m) for m in modules]
    report = accuracy_report(scores_all, labels_all, names)
    per_class = [{"class": m.source_class, "name": names[i], "count": report["per_class"][i]["count"],
                  "composed_top1": report["per_class"][i]["top1"], "kept_fraction": round(m.kept_fraction(), 6),
                  **binary_report(scores_all, labels_all, i)} for i, m in enumerate(modules)]
    kept = [m.kept_fraction() for m in modules]
    balanced = [c["top1"] for c in report["per_class"] if c["top1"] is not None]
    return {"composed_top1": report["top1"], "composed_top5": report["top5"],
            "composed_balanced_top1": round(sum(balanced) / len(balanced), 4) if balanced else None,
            "jaccard_model_mean": round(sum(kept) / len(kept), 6), "test_images": int(labels_all.numel()),
            "composed_seconds": round(composed_seconds, 3), "per_class": per_class}


def evaluate_merged_slim(path, data: str | None, data_root: str | None, device: torch.device, batch_size: int,
                         cost: bool, latency_batch: int, started: float) -> dict:
    """A merged slim composition against its source model on the same test images."""
    from types import SimpleNamespace

    from .cost import cost_report
    from .store import load_merged_slim

    merged, source = load_merged_slim(path, device)
    test = test_set_for(source, data, data_root).subset(merged.concerned)
    parts = [SimpleNamespace(concerned=c, class_name=n, kept_fraction=lambda: merged.metrics["params_fraction"])
             for c, n in zip(merged.concerned, merged.class_names, strict=True)]
    report = evaluate_modules(parts, test, device, batch_size, source=source, composition=merged)
    if cost:
        report["cost"] = {"composition": cost_report(merged, test.images[:latency_batch].to(device), source=source)}
    return {"paths": [str(path)], "data": data or source.dataset, "variant": "channel", "modules": len(parts),
            "calibration": "none", "mode": "merged", **report, "seconds": round(time.perf_counter() - started, 3)}


def fused_classes(fused) -> list:
    """A fused slim composition's classes as :func:`evaluate_composition` reads modules: data set, class, name."""
    from types import SimpleNamespace

    return [SimpleNamespace(dataset=part.source_info.get("dataset", ""), source_class=c, class_name=n,
                            kept_fraction=lambda part=part: part.metrics["params_fraction"])
            for part in fused.parts for c, n in zip(part.classes, part.class_names, strict=True)]


def evaluate_fused(fused, data_root: str | None, device: torch.device, batch_size: int = 512,
                   per_class: int | None = None) -> dict:
    """A fused slim composition's top-1, top-5 and per-class accuracy on its classes' test images."""
    classes = fused_classes(fused)
    return {**evaluate_composition(classes, data_root, device, batch_size, per_class=per_class, composition=fused),
            "modules": len(classes)}


def evaluate_fused_slim(path, data: str | None, data_root: str | None, device: torch.device, batch_size: int,
                        cost: bool, latency_batch: int, started: float) -> dict:
    """A fused slim composition (merged slim networks of several models) on the union of its classes' test
    images, each from its own data set; its cost against the sum of its source models'."""
    from .cost import cost_report
    from .store import load_fused_slim

    if data is not None:
        raise UserError("--data applies to modules of one model; a composition across models is evaluated on each "
                        "class's own data set")
    fused, sources = load_fused_slim(path, device)
    report = evaluate_fused(fused, data_root, device, batch_size)
    if cost:
        images = composition_test_sets(fused_classes(fused), data_root)[0][0].images[:latency_batch].to(device)
        report["cost"] = {"composition": cost_report(fused, images, source=sources)}
    return {"paths": [str(path)], "variant": "channel", "modules": report["modules"], "parts": len(fused.parts),
            "calibration": "none", "mode": "fused", **report, "seconds": round(time.perf_counter() - started, 3)}
