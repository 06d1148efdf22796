"""Calibrated module scores (METHOD.md section 8): modules of different models put p_c on different scales, so
composing them compares apples with oranges. Each module's margin m = z_c - z_uc gets two fits on held-out
training data of its source model, class-balanced (the module's class weighs as much as all the others):

    temperature   p = sigmoid(m / T)
    platt         p = sigmoid(a * m + b)

A composition picks one with ``calibration="none" | "temperature" | "platt"`` ("none" is the paper's p_c).
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "temperature", "platt")


def _balanced_bce(logits: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy in which the inputs of the class (``targets``) weigh as much as all the others;
    ``soft`` replaces the hard targets by probabilities (a teacher's), keeping the weighting."""
    pos, neg = targets, ~targets
    goal = targets.to(logits.dtype) if soft is None else soft.to(logits.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, goal, reduction="none")
    total = logits.new_zeros(())
    if pos.any():
        total = total + 0.5 * loss[pos].mean()
    if neg.any():
        total = total + 0.5 * loss[neg].mean()
    return total


def _minimise(params: list[torch.Tensor], closure_loss) -> None:
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


def fit(margins: torch.Tensor, targets: torch.Tensor) -> dict:
    """Both fits of one module from its margins on held-out inputs and whether each input is of its class."""
    m = margins.detach().double().cpu()
    t = targets.detach().bool().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _minimise([log_t], lambda: _balanced_bce(m / log_t.exp(), t))
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    _minimise([ab], lambda: _balanced_bce(ab[0] * m + ab[1], t))
    temperature = float(log_t.detach().exp())
    a, b = (float(v) for v in ab.detach())
    if not (math.isfinite(temperature) and math.isfinite(a) and math.isfinite(b)):  # separable data: no scale
        temperature, a, b = 1.0, 1.0, 0.0
    return {"temperature": temperature, "platt": [a, b], "positives": int(t.sum()), "negatives": int((~t).sum()),
            "loss_none": float(_balanced_bce(m, t)),
            "loss_temperature": float(_balanced_bce(m / temperature, t)),
            "loss_platt": float(_balanced_bce(a * m + b, t))}


def fit_head(features: torch.Tensor, targets: torch.Tensor, init_w: torch.Tensor, init_b: float,
             l2: float = 1e-4, soft: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Class-balanced logistic regression of "mine" on the head's input features: the margin's weights
    (with ``soft``, of the teacher's probabilities that each input is of the class)."""
    f = features.detach().double().cpu()
    w = init_w.detach().double().cpu().clone().requires_grad_(True)
    b = torch.tensor(float(init_b), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    t = targets.cpu()
    p = soft.detach().double().cpu() if soft is not None else None

    def closure():
        opt.zero_grad()
        loss = _balanced_bce(f @ w + b, t, p) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), float(b.detach())


def score(logits: torch.Tensor, calibration: dict | None, mode: str = "none") -> torch.Tensor:
    """p_c from two-way logits (..., 2) [z_c, z_uc]: softmax([z_c, z_uc])[0] = sigmoid(z_c - z_uc), calibrated
    as ``mode`` asks."""
    return apply(logits[..., 0] - logits[..., 1], calibration, mode)


def apply(margins: torch.Tensor, calibration: dict | None, mode: str) -> torch.Tensor:
    """p_c from margins (any shape) under ``mode``; a module without a fit keeps the paper's score."""
    if mode == "none" or not calibration:
        return torch.sigmoid(margins)
    if mode == "temperature":
        return torch.sigmoid(margins / calibration["temperature"])
    a, b = calibration["platt"]
    return torch.sigmoid(a * margins + b)
