"""Calibrated module scores (docs/method.md, "Calibrated scores"): modules of other models put p_c on other scales, so
composing them compares apples with oranges. Each module's margin m = z_c - z_uc gets two fits on held-out
training data of its source model, class-balanced (the module's class weighs as much as all the others):

    temperature   p = sigmoid(m / T)
    platt         p = sigmoid(a * m + b)

A composition picks one with ``calibration="none" | "temperature" | "platt" | "platt-ood"`` ("none" is the
paper's p_c).

"platt-ood" (beyond the paper) multiplies the Platt score by an in-distribution test, for compositions across
data sets: a module has only ever seen its own data set, and on another one's images its margin means nothing
(a digits module can be sure a T-shirt is an "8"). At decomposition each module also gets, per observation
point and for its head's input, class means and a shared covariance of its own (masked) activations, averaged
over positions, fitted on the observed inputs of its source's training set (:func:`fit_typical`). An input's
distance is the sum over those layers of its Mahalanobis distance to the nearest class mean, each layer's
divided by its median on the held-out calibration inputs; its p-value is the share of held-out inputs at
least as far (a conformal p-value: uniform on the module's own data), and the score is multiplied by
min(1, p / TYPICAL_ALPHA). Modules of one source see nearly the same activations, so their scores are scaled
alike and their vote hardly changes; a module shown another data set's images gets a p-value near 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = ("none", "temperature", "platt", "platt-ood")
TYPICAL_ALPHA = 0.2  # p-values above it leave the score as it is (0.05, 0.2 and 1 compared on the quick study)
_RIDGE = 1e-3        # covariance + _RIDGE * mean variance * I: masked (constant) channels stay invertible


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
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
    _minimise([log_t], lambda: balanced_bce(m / log_t.exp(), t))
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    _minimise([ab], lambda: balanced_bce(ab[0] * m + ab[1], t))
    temperature = float(log_t.detach().exp())
    a, b = (float(v) for v in ab.detach())
    if not (math.isfinite(temperature) and math.isfinite(a) and math.isfinite(b)):  # separable data: no scale
        temperature, a, b = 1.0, 1.0, 0.0
    return {"temperature": temperature, "platt": [a, b], "positives": int(t.sum()), "negatives": int((~t).sum()),
            "loss_none": float(balanced_bce(m, t)),
            "loss_temperature": float(balanced_bce(m / temperature, t)),
            "loss_platt": float(balanced_bce(a * m + b, t))}


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
        loss = balanced_bce(f @ w + b, t, p) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), float(b.detach())


class Typical:
    """A module's in-distribution test (:func:`fit_typical`) as ``typical``: a dict of tensors, or None; kept
    as buffers so that moving the module moves them. For :class:`torch.nn.Module` subclasses."""

    @property
    def typical(self) -> dict[str, torch.Tensor] | None:
        names = getattr(self, "_typical_names", [])
        return {k: getattr(self, f"typical_{i}") for i, k in enumerate(names)} if names else None

    @typical.setter
    def typical(self, stats: dict[str, torch.Tensor] | None) -> None:
        for i in range(len(getattr(self, "_typical_names", []))):
            delattr(self, f"typical_{i}")
        self._typical_names = list(stats) if stats else []
        for i, k in enumerate(self._typical_names):
            self.register_buffer(f"typical_{i}", stats[k], persistent=False)


def _distances(stats: dict[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of rows ``x`` (B, F) to the nearest class mean of one layer: (B,)."""
    mean, precision = stats[f"mean.{layer}"].to(x), stats[f"precision.{layer}"].to(x)
    xp = x @ precision
    d = (xp * x).sum(1, keepdim=True) - 2 * xp @ mean.T + ((mean @ precision) * mean).sum(1)[None]
    return d.min(1).values.clamp(min=0)


def _total_distance(stats: dict[str, torch.Tensor], layers: list[torch.Tensor]) -> torch.Tensor:
    x = [t.reshape(t.shape[0], -1).double() for t in layers]
    if len(x) != int(stats["layers"]):
        raise ValueError(f"the in-distribution test was fitted on {int(stats['layers'])} layers, given {len(x)}")
    return sum(_distances(stats, i, t) / stats[f"scale.{i}"].to(t) for i, t in enumerate(x))


def fit_typical(fit_layers: list[torch.Tensor], labels: torch.Tensor, held_layers: list[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The in-distribution test of one module: per layer, class means (C, F) and the precision (F, F) of the
    activations ``fit_layers`` (each (N, F); ``labels`` (N,) their classes) about their class means; the median
    distance on the held-out ``held_layers`` (each (M, F)) as the layer's scale; and the held-out inputs'
    summed distances, sorted, for the p-values."""
    stats: dict[str, torch.Tensor] = {"layers": torch.tensor(len(fit_layers))}
    labels = labels.cpu()
    classes = labels.unique()
    for i, f in enumerate(fit_layers):
        f = f.reshape(f.shape[0], -1).double().cpu()
        mean = torch.stack([f[labels == c].mean(0) for c in classes])
        centred = f - mean[torch.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(f)
        ridge = max(_RIDGE * float(cov.diagonal().mean()), 1e-12)
        stats[f"mean.{i}"] = mean
        stats[f"precision.{i}"] = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
        held = held_layers[i].reshape(held_layers[i].shape[0], -1).double().cpu()
        stats[f"scale.{i}"] = _distances(stats, i, held).median().clamp(min=1e-12)
    stats["held"] = _total_distance(stats, held_layers).sort().values
    return {k: v.float() if v.is_floating_point() else v for k, v in stats.items()}


def typicality(stats: dict[str, torch.Tensor] | None, layers: list[torch.Tensor]) -> torch.Tensor:
    """min(1, p / TYPICAL_ALPHA) for each input, p its conformal p-value of being of the module's data set:
    (1 + held-out inputs at least as far) / (held-out inputs + 1). ``layers``: the pooled activations of every
    observation point, then the head's input, each (B, F)."""
    if stats is None:
        raise ValueError("the module has no in-distribution test; decompose it with --calibration-samples N > 0")
    distance = _total_distance(stats, layers)
    held = stats["held"].to(distance)
    at_least_as_far = (held[None, :] >= distance[:, None]).sum(1)  # a comparison, not searchsorted: ONNX has it
    p = (1 + at_least_as_far).to(distance) / (held.numel() + 1)
    return (p / TYPICAL_ALPHA).clamp(max=1).float()


def margin(module, features: torch.Tensor) -> torch.Tensor:
    """``z_c - z_uc`` of a module's two-way head (``head_weight`` (2, F), ``head_bias`` (2,)) on its input (B, F)."""
    w, b = module.head_weight, module.head_bias
    return features @ (w[0] - w[1]) + b[0] - b[1]


def gated_score(module, layers: list[torch.Tensor]) -> torch.Tensor:
    """A module's "platt-ood" p_c (node-level or slim) from ``layers``: its pooled activations at every point,
    then its head's input, each (B, F)."""
    return apply(margin(module, layers[-1]), module.calibration, "platt-ood", typicality(module.typical, layers))


def module_score(module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """p_c of a module (node-level or slim: ``forward``, ``features``, ``calibration``) on its prepared input
    ``x`` under ``mode``."""
    if mode != "platt-ood":
        return score(module(x), module.calibration, mode)
    pooled: list[torch.Tensor] = []
    features = module.features(x, pooled)[0]
    return gated_score(module, [p[0] for p in pooled] + [features])


def score(logits: torch.Tensor, calibration: dict | None, mode: str = "none") -> torch.Tensor:
    """p_c from two-way logits (..., 2) [z_c, z_uc]: softmax([z_c, z_uc])[0] = sigmoid(z_c - z_uc), calibrated
    as ``mode`` asks."""
    return apply(logits[..., 0] - logits[..., 1], calibration, mode)


def apply(margins: torch.Tensor, calibration: dict | None, mode: str, gate: torch.Tensor | None = None
          ) -> torch.Tensor:
    """p_c from margins (any shape) under ``mode``; a module without a fit keeps the paper's score. "platt-ood"
    needs the inputs' ``gate`` (:func:`typicality`)."""
    if mode == "none" or not calibration:
        return torch.sigmoid(margins)
    if mode == "temperature":
        return torch.sigmoid(margins / calibration["temperature"])
    a, b = calibration["platt"]
    p = torch.sigmoid(a * margins + b)
    if mode == "platt-ood":
        if gate is None:
            raise ValueError("platt-ood scores need the inputs' in-distribution gate")
        p = p * gate.to(p)
    return p


def source_log_odds(net: nn.Module, x: torch.Tensor, batch_size: int = 256,
                    classes: list[int] | None = None) -> torch.Tensor:
    """(N, K): for every input and class c, the network's log-odds of c against all other classes
    (z_c - logsumexp of the others): sigmoid of it is the network's p_c. With ``classes``, among those only
    (columns in their order): the model restricted to them."""
    with torch.no_grad():
        z = torch.cat([net(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()
    if classes is not None:
        z = z[:, classes]
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    rest = torch.logsumexp(z.unsqueeze(1).masked_fill(eye, float("-inf")), 2)
    return (z - rest).float()


def model_log_odds(source, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, K) on the CPU: :func:`source_log_odds` of a classifier's network (``source.net``, in eval mode for the
    pass) on uint8 ``images``, prepared (``source.prepare``) and run in batches on the network's device."""
    net = source.net
    device = next(net.parameters()).device
    training = net.training
    net.eval()
    try:
        return torch.cat([source_log_odds(net, source.prepare(images[i:i + batch_size].to(device)), batch_size).cpu()
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        net.train(training)
