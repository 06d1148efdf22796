"""Heads of one model's modules refitted together for their composition (docs/method.md, "Slim modules").

Each module's head is fitted alone, to its own class-balanced binary loss; composed, the highest p_c wins, so
every module's error on every input enters the argmax. :func:`fit_heads_jointly` refits the heads of modules
made from one source model (one per class of it) on shared inputs, to each module's own binary loss plus
``weight`` times the cross-entropy of the softmax over their margins against the softmax over the source's
log-odds: the same optimum as each head alone (a margin equal to the source's log-odds minimises both), but
errors where two classes compete weigh more. The backbones are untouched; each module stays a binary
classifier of its class against all others.
"""

from __future__ import annotations

import torch

from ..core.calibrate import balanced_bce, model_log_odds
from ..data.dataset import ImageSet
from ..errors import UserError
from ..models.classifier import Classifier
from ..modules.base import BinaryModule


def check_every_class(classes: list[int], num_classes: int) -> None:
    """Heads are refitted together for a module of every class of one model: one line when ``classes`` are
    fewer."""
    if sorted(classes) != list(range(num_classes)):
        raise UserError(f"«joint_heads» refits the heads of a module of every class together; these are "
                        f"{len(classes)} of the model's {num_classes} classes: decompose every class, or leave "
                        "«joint_heads» at 0")


def module_features(modules: list[BinaryModule], images: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
    """Each module's head input (N, F_k) on uint8 ``images``, in batches, without gradients."""
    out = []
    with torch.no_grad():
        for m in modules:
            device = m.head_weight.device
            out.append(torch.cat([m.features(m.prepare(images[i:i + batch_size].to(device)))[0].double().cpu()
                                  for i in range(0, images.shape[0], batch_size)]))
    return out


def fit_heads_jointly(modules: list[BinaryModule], source: Classifier, data: ImageSet, index: torch.Tensor,
                      weight: float = 1.0, l2: float = 1e-4, batch_size: int = 512,
                      odds: torch.Tensor | None = None) -> dict:
    """Refit, in place, the heads of ``modules`` (binary modules of ``source``, one per class, every class of it)
    on the inputs ``data.images[index]``; returns the fit's losses before and after. ``odds``: the source's
    log-odds on those inputs (N, K), when already computed."""
    classes = [m.concerned for m in modules]
    check_every_class(classes, source.num_classes)
    images = data.images[index]
    labels = data.labels[index]
    if odds is None:
        odds = model_log_odds(source, images, batch_size)
    odds = odds.double()[:, classes]
    soft = torch.sigmoid(odds)
    target = torch.softmax(odds, 1)
    mine = labels[:, None] == torch.tensor(classes)[None, :]
    features = module_features(modules, images, batch_size)
    ws = [(m.head_weight[0] - m.head_weight[1]).detach().double().cpu().clone().requires_grad_(True) for m in modules]
    bs = [(m.head_bias[0] - m.head_bias[1]).detach().double().cpu().clone().requires_grad_(True) for m in modules]

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        margins = torch.stack([f @ w + b for f, w, b in zip(features, ws, bs, strict=True)], 1)
        binary = sum(balanced_bce(margins[:, k], mine[:, k], soft[:, k]) for k in range(len(modules)))
        joint = -(target * torch.log_softmax(margins, 1)).sum(1).mean()
        return binary, joint

    with torch.no_grad():
        before = [float(v) for v in losses()]
    opt = torch.optim.LBFGS(ws + bs, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        binary, joint = losses()
        loss = binary + weight * joint + l2 * sum((w * w).sum() for w in ws)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = [float(v) for v in losses()]
        for m, w, b in zip(modules, ws, bs, strict=True):
            hw, hb = m.head_weight, m.head_bias
            hw[0].copy_(hw[1] + w.to(hw))
            hb[0].copy_(hb[1] + b.to(hb))
    return {"inputs": int(index.numel()), "weight": weight, "binary_before": before[0], "joint_before": before[1],
            "binary_after": after[0], "joint_after": after[1]}

