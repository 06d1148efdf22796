"""Measuring a composition (any :class:`~cnnmod.composition.base.Composer`): against its source model on the same
test images, or on the union of its classes' test images, each from its own data set."""

from __future__ import annotations

import time

import torch

from ..core.metrics import accuracy_report, predict_scores
from ..data import load
from ..data.dataset import ImageSet
from ..data.torch_dataset import as_image_set
from ..models.classifier import Classifier
from ..modules.base import ClassRef
from ..runtime import Distributed
from .base import Composer


def binary_report(scores: torch.Tensor, labels: torch.Tensor, column: int, votes: torch.Tensor | None = None) -> dict:
    """A module's own task on a test set: does it vote "mine" (p_c > 0.5, or as ``votes`` says) exactly for its
    class's images? Accuracy, balanced accuracy (the mean of the two rates below), true positive and true
    negative rates, in %."""
    votes = scores[:, column] > 0.5 if votes is None else votes
    mine = labels == column
    pos, neg = int(mine.sum()), int((~mine).sum())
    tpr = 100.0 * float(votes[mine].float().mean()) if pos else None
    tnr = 100.0 * float((~votes[~mine]).float().mean()) if neg else None
    return {"binary_accuracy": round(100.0 * float((votes == mine).float().mean()), 4) if labels.numel() else None,
            "balanced_accuracy": round((tpr + tnr) / 2, 4) if pos and neg else None,
            "true_positive_rate": round(tpr, 4) if pos else None,
            "true_negative_rate": round(tnr, 4) if neg else None}


def composed_scores(composer: Composer, images: torch.Tensor, device: torch.device, batch_size: int,
                    dd: Distributed | None = None) -> torch.Tensor:
    """The composer's scores (N, K) on uint8 ``images``, batched (the batch divided by its passes per image);
    sharded over torchrun's ranks with ``dd``."""
    return predict_scores(composer, lambda x: x, images, device, max(8, batch_size // composer.passes), dd)


def evaluate_against_model(composer: Composer, source: Classifier, test: ImageSet, device: torch.device,
                           batch_size: int = 512, dd: Distributed | None = None) -> dict:
    """The source model vs ``composer`` (of classes of that model) on ``test``, whose labels are the composer's
    columns (an :class:`ImageSet` or a torch Dataset of (image, label) pairs). The model is scored on the same
    classes (its logits restricted to them)."""
    test = as_image_set(test, [r.name for r in composer.refs])
    source = source.to(device).eval()
    columns = torch.tensor([r.index for r in composer.refs])
    model_scores = predict_scores(lambda x: source(x)[:, columns.to(x.device)], source.prepare, test.images,
                                  device, batch_size, dd)
    composer = composer.to(device).eval()
    started = time.perf_counter()
    scores = composed_scores(composer, test.images, device, batch_size, dd)
    composed_seconds = time.perf_counter() - started
    model = accuracy_report(model_scores, test.labels, test.class_names)
    composed = accuracy_report(scores, test.labels, test.class_names)
    kept = composer.kept_fractions()
    per_class = []
    for i, r in enumerate(composer.refs):
        per_class.append({"class": r.index, "name": r.name, "count": model["per_class"][i]["count"],
                          "model_top1": model["per_class"][i]["top1"],
                          "composed_top1": composed["per_class"][i]["top1"],
                          "kept_fraction": round(kept[i], 6), **binary_report(scores, test.labels, i)})
    pairwise = composer.pairwise_jaccard()
    return {"model_top1": model["top1"], "model_top5": model["top5"],
            "composed_top1": composed["top1"], "composed_top5": composed["top5"],
            "top1_change_pp": round(composed["top1"] - model["top1"], 4),
            "top5_change_pp": round(composed["top5"] - model["top5"], 4),
            "jaccard_model_mean": round(sum(kept) / len(kept), 6),
            "jaccard_pairwise_mean": round(pairwise, 6) if pairwise is not None else None,
            "test_images": len(test), "composed_seconds": round(composed_seconds, 3), "per_class": per_class}


def composition_test_sets(refs: list[ClassRef], data_root: str | None, per_class: int | None = None
                          ) -> list[tuple[ImageSet, torch.Tensor]]:
    """The test images of a composition's classes, one chunk per data set, each with its labels mapped to the
    composition's positions (at most ``per_class`` images of each class, in test-set order, when given)."""
    chunks = []
    for name in dict.fromkeys(r.dataset for r in refs):
        positions = [i for i, r in enumerate(refs) if r.dataset == name]
        test = load(name, "test", data_root).subset([refs[i].source_class for i in positions])
        if per_class is not None:
            test = test.first_per_class(per_class)
        chunks.append((test, torch.tensor(positions)[test.labels]))
    return chunks


def evaluate_composition(composer: Composer, data_root: str | None, device: torch.device, batch_size: int = 512,
                         per_class: int | None = None, cache: dict | None = None, dd: Distributed | None = None
                         ) -> dict:
    """A composition of modules from any models: top-1, top-5 and per-class accuracy on the union of its classes'
    test images, each from its own data set.

    Given a ``cache`` (a dict kept by the caller), a composer whose columns are computed separately (voting,
    :meth:`Composer.separately`) has each column's scores on each test chunk computed once and reused by later
    compositions that hold the same module object (a study evaluates many compositions that share most of their
    modules)."""
    composer = composer.to(device).eval()
    separate = composer.separately() if cache is not None else None
    refs = composer.refs
    scores, labels = [], []
    started = time.perf_counter()
    for test, mapped in composition_test_sets(refs, data_root, per_class):
        if separate is None:
            scores.append(composed_scores(composer, test.images, device, batch_size, dd))
        else:
            columns = []
            for key, alone in separate:
                entry = (key, composer.calibration, test.name, tuple(test.source_classes), per_class)
                if entry not in cache:  # the part is kept with its scores, so its key is not reused
                    cache[entry] = (alone, predict_scores(alone, lambda x: x, test.images, device, batch_size,
                                                          dd)[:, 0])
                columns.append(cache[entry][1])
            scores.append(torch.stack(columns, 1))
        labels.append(mapped)
    composed_seconds = time.perf_counter() - started
    scores_all, labels_all = torch.cat(scores), torch.cat(labels)
    names = composer.qualified_names
    report = accuracy_report(scores_all, labels_all, names)
    kept = composer.kept_fractions()
    per_class_rows = [{"class": r.source_class, "name": names[i], "count": report["per_class"][i]["count"],
                       "composed_top1": report["per_class"][i]["top1"], "kept_fraction": round(kept[i], 6),
                       **binary_report(scores_all, labels_all, i)} for i, r in enumerate(refs)]
    balanced = [c["top1"] for c in report["per_class"] if c["top1"] is not None]
    return {"composed_top1": report["top1"], "composed_top5": report["top5"],
            "composed_balanced_top1": round(sum(balanced) / len(balanced), 4) if balanced else None,
            "jaccard_model_mean": round(sum(kept) / len(kept), 6), "test_images": int(labels_all.numel()),
            "composed_seconds": round(composed_seconds, 3), "per_class": per_class_rows}
