"""Accuracy measures: top-k, per-class accuracy, and batched prediction over an image set."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.dataset import ImageSet
from ..data.stream import FileImages, batched
from ..runtime import Distributed


@torch.no_grad()
def predict_scores(score_fn: Callable[[torch.Tensor], torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor],
                   images: torch.Tensor | FileImages, device: torch.device, batch_size: int = 512,
                   dd: Distributed | None = None) -> torch.Tensor:
    """Scores (N, K) of ``score_fn`` over uint8 ``images`` (in memory or streamed), batched, returned on the
    CPU. Under torchrun (``dd``) every rank scores every world-th batch and all get the whole (N, K)."""
    dd = dd or Distributed()
    chunks = list(torch.arange(images.shape[0]).split(max(1, batch_size)))
    mine = chunks[dd.rank::dd.world]
    out = []
    for x in batched(images, mine):
        out.append(score_fn(prepare(x.to(device, non_blocking=True))).float().cpu())
    if not dd.active:
        return torch.cat(out) if out else torch.zeros(0, 0)
    width = int(dd.all_reduce_max(torch.tensor([out[0].shape[1] if out else 0], device=device))[0])
    full = torch.zeros(images.shape[0], width)
    for c, scores in zip(mine, out, strict=True):
        full[c] = scores
    return dd.all_reduce_sum(full.to(device)).cpu()


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N,): the label is among the ``k`` highest scores (ties broken by index, like torch.topk)."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def accuracy_report(scores: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Top-1, top-5 and per-class top-1 accuracy, in percent."""
    top1 = topk_correct(scores, labels, 1)
    top5 = topk_correct(scores, labels, 5)
    per_class = []
    for c, name in enumerate(class_names):
        sel = labels == c
        n = int(sel.sum())
        per_class.append({"class": c, "name": name, "count": n,
                          "top1": round(100.0 * float(top1[sel].float().mean()), 4) if n else None})
    n = max(labels.numel(), 1)
    return {"top1": round(100.0 * float(top1.sum()) / n, 4), "top5": round(100.0 * float(top5.sum()) / n, 4),
            "count": int(labels.numel()), "per_class": per_class}


def evaluate_classifier(clf, data: ImageSet, device: torch.device, batch_size: int = 512,
                        dd: Distributed | None = None) -> dict:
    """Accuracy report of a :class:`~cnnmod.classifier.Classifier` on ``data`` (classes must correspond);
    sharded over torchrun's ranks when ``dd`` is given."""
    clf = clf.to(device).eval()
    scores = predict_scores(clf, clf.prepare, data.images, device, batch_size, dd)
    return accuracy_report(scores, data.labels, data.class_names)
