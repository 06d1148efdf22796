"""Decomposition (docs/method.md, "Concern and tangling identification" to "MC-BI"): concern identification,
tangling identification, channeling into
the binary head, and the paper's three variants, all computed from one pass of activation statistics.

    mc      CI + TI + MC                    masks from activity; the two-way head
    mc-bln  CI + TI + MC-BLN  (the default)  and features that the head marks switched off at their producers
    mc-bi   CI + TI + MC-BLN + MC-BI        and every node whose value no longer reaches the head
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..composition.fitting import calibrate_decomposition
from ..core.graph import ModelGraph
from ..core.masking import binary_head
from ..core.observe import ActivationStats, Sampling, observe, tangling_budget
from ..data.dataset import ImageSet
from ..data.torch_dataset import as_image_set
from ..errors import UserError
from ..models.classifier import as_classifier, check_data, chosen_classes
from ..modules.base import ModuleRecord
from ..runtime import Clock, Distributed, Passes
from .module import Module
from .walks import mark_back
from .walks import needed as walks_needed

VARIANTS = ("mc", "mc-bln", "mc-bi")
CONDITIONS = ("pseudocode", "prose")


@dataclass(frozen=True)
class Ablation:
    """Readings of the paper that its text leaves open, measured by benchmarks/decomposition.py and not offered as
    settings (the defaults are the paper's pseudo-code): MC-BLN's marking ``condition`` (its pseudo-code, or its
    prose), an activation-rate threshold ``tau`` for concern identification (0: the paper's), observing only
    inputs the model gets right (``correct_only``), and ``delta`` in units of the weights it is compared with
    (``relative_delta``: their root mean square)."""

    condition: str = "pseudocode"
    tau: float = 0.0
    correct_only: bool = False
    relative_delta: bool = False

    def check(self) -> None:
        if self.condition not in CONDITIONS:
            raise UserError(f"unknown MC-BLN condition {self.condition!r}; choose pseudocode or prose")
        if not 0.0 <= self.tau <= 1.0:
            raise UserError(f"tau is an activation rate in [0, 1], got {self.tau}")


@dataclass(frozen=True)
class DecomposeSettings:
    """Every switch of the method (docs/method.md), recorded with each module it made; checked once."""

    variant: str = "mc-bln"
    delta: float = 0.5
    ci_samples: int = 1000          # concerned inputs observed per class
    seed: int = 0
    calibration_samples: int = 100  # held-out training inputs per class to fit score calibration (0: none)
    exact_only: bool = False        # switch nodes off only at points a ReLU follows (where off means 0 anyway)
    ablation: Ablation = Ablation()  # the paper's open readings, for benchmarks (not a setting)

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        self.ablation.check()
        if self.delta < 0:
            raise UserError(f"«delta» must be >= 0, got {self.delta}")
        if self.ci_samples < 1:
            raise UserError(f"«ci_samples» must be at least 1, got {self.ci_samples}")
        if self.calibration_samples < 0:
            raise UserError(f"«calibration_samples» must be >= 0, got {self.calibration_samples}")

    def record(self) -> dict:
        """The settings as a module records them: flat, the ablation's readings among them, in the order module
        folders have always had them (:func:`settings_of` reads them back)."""
        a = self.ablation
        return {"variant": self.variant, "delta": self.delta, "condition": a.condition, "ci_samples": self.ci_samples,
                "correct_only": a.correct_only, "tau": a.tau, "seed": self.seed,
                "calibration_samples": self.calibration_samples, "exact_only": self.exact_only,
                "relative_delta": a.relative_delta}


def keep_masks(stats: ActivationStats, concerned: int, tau: float = 0.0) -> dict[str, torch.Tensor]:
    """CI + TI (docs/method.md, "Concern and tangling identification"): nodes active for a concerned input
    (rate >= tau), or for one of the first k inputs of some unconcerned class, k = max(1, floor(N_concerned /
    (n - 1)))."""
    n = stats.num_classes
    k = tangling_budget(int(stats.observed[concerned]), n)
    threshold = tau * float(stats.observed[concerned])
    masks = {}
    for p in stats.points:
        keep = stats.mine(p, concerned)
        if tau > 0:
            keep = keep & (stats.count(p, concerned).float() >= threshold)
        if n > 1:
            keep = keep | stats.others_early(p, concerned, k)
        masks[p.name] = keep
    return masks


def marked_features(head_weight: torch.Tensor, delta: float, condition: str = "pseudocode") -> torch.Tensor:
    """MC-BLN's marked head inputs from the module's two head rows [c, uc] (docs/method.md, "MC-BLN")."""
    w_c, w_uc = head_weight[0], head_weight[1]
    if condition == "pseudocode":
        return (w_uc <= -delta) & (w_c >= delta)
    return (w_c.abs() < delta) & (w_uc >= delta)


def module_masks(graph: ModelGraph, stats: ActivationStats, concerned: int, head_weight: torch.Tensor,
                 s: DecomposeSettings) -> dict[str, torch.Tensor]:
    masks = keep_masks(stats, concerned, s.ablation.tau)
    if s.exact_only:
        masks = {n: m if n in graph.exact_points else torch.ones_like(m) for n, m in masks.items()}
    return apply_variant(graph, masks, head_weight, s)


def apply_variant(graph: ModelGraph, masks: dict[str, torch.Tensor], head_weight: torch.Tensor,
                  s: DecomposeSettings) -> dict[str, torch.Tensor]:
    """MC-BLN's and MC-BI's switching off, as the variant asks, on top of CI + TI's keep masks (with
    ``exact_only``, MC-BLN switches off only at the points a ReLU follows)."""
    masks = dict(masks)
    if s.variant in ("mc-bln", "mc-bi"):
        w, a = head_weight.cpu(), s.ablation
        delta = s.delta * float(w.pow(2).mean().sqrt()) if a.relative_delta else s.delta
        off = mark_back(graph, marked_features(w, delta, a.condition), s.delta, relative=a.relative_delta)
        for name, region in off.items():
            if not s.exact_only or name in graph.exact_points:
                masks[name] = masks[name] & ~region
    if s.variant == "mc-bi":
        needed = walks_needed(graph, masks)
        masks = {name: m & needed[name] for name, m in masks.items()}
    return masks


def decompose(model: nn.Module, data: ImageSet, variant: str | None = None, *, classes: list[int] | None = None,
              settings: DecomposeSettings | None = None, passes: Passes | None = None,
              stats: ActivationStats | None = None, clock: Clock | None = None) -> list[Module]:
    """One module per class (or per class in ``classes``) of ``model``, observed on ``data`` (its training split:
    an :class:`ImageSet`, or a torch Dataset of (image, label) pairs).

    ``settings`` holds every switch; ``variant``, when given, overrides ``settings.variant``. ``passes``: the
    device (default: the model's), batch size, torchrun processes and progress of the passes over ``data``.
    ``stats`` reuses an earlier observation pass (all three variants come from the same one). ``clock``: where
    the decomposition and the calibration are timed for the job (each module records its own seconds too).
    """
    passes = passes or Passes()
    device, batch_size, dd = passes.device, passes.batch_size, passes.dd
    s = settings or DecomposeSettings()
    if variant is not None:
        s = replace(s, variant=variant)
    s.check()
    data = as_image_set(data)
    clf = as_classifier(model, data)
    check_data(clf, data)
    if device is not None:
        clf = clf.to(device)
    device = next(clf.parameters()).device
    chosen = chosen_classes(clf, classes)
    graph = ModelGraph(clf.net, clf.spec.shape)
    graph.require_relu()
    clock = clock or Clock()
    started = time.perf_counter()
    with clock("decomposition"):
        if stats is None:
            sampling = Sampling(s.ci_samples, s.seed, s.ablation.correct_only, counts=s.ablation.tau > 0)
            stats = observe(clf.net, graph, clf.prepare, data, sampling, replace(passes, device=device))
        weight, bias = (t.cpu() for t in graph.head.linear_map(clf.net))
        modules = []
        scratch = weight.new_empty((weight.shape[0] - 1, weight.shape[1]))
        for c in chosen:
            hw, hb = binary_head(weight, bias, c, scratch)
            masks = module_masks(graph, stats, c, hw, s)
            recorded = {**s.record(), "observed": int(stats.observed[c])}
            modules.append(Module(clf, graph, c, masks, hw, hb, ModuleRecord(recorded)).to(device))
    seconds = time.perf_counter() - started
    for m in modules:
        m.metrics["kept_fraction"] = round(m.kept_fraction(), 6)
        m.settings["decomposition_seconds"] = round(seconds, 3)
    if s.calibration_samples > 0:
        started = time.perf_counter()
        with clock("calibration"):
            calibrate_sharded(modules, data, s.calibration_samples, s.seed, batch_size, dd, passes.progress)
        for m in modules:
            m.settings["calibration_seconds"] = round(time.perf_counter() - started, 3)
    return modules


def calibrate_sharded(modules: list[Module], data: ImageSet, per_class: int, seed: int, batch_size: int,
                      dd: Distributed, show: bool = True) -> None:
    """Calibration of every module, each rank fitting every world-th module (each module's fit is its own),
    the fits then shared with every rank."""
    mine = modules[dd.rank::dd.world]
    if mine:
        calibrate_decomposition(mine, data, per_class, seed, batch_size, show and dd.is_main)
    fits = dd.gather_objects([(m.calibration, {k: v.cpu() for k, v in (m.typical or {}).items()} or None)
                              for m in mine])
    for r, part in enumerate(fits):
        for m, (calibration, typical) in zip(modules[r::dd.world], part, strict=True):
            m.calibration = calibration
            m.typical = {k: v.to(m.head_weight.device) for k, v in typical.items()} if typical else None


def settings_of(module: Module) -> DecomposeSettings:
    """The settings a module was made with (as recorded in it: :meth:`DecomposeSettings.record`)."""
    made = module.settings
    ablation = Ablation(**{k: made[k] for k in Ablation.__dataclass_fields__ if k in made})
    names = set(DecomposeSettings.__dataclass_fields__) - {"ablation"}
    return DecomposeSettings(**{k: v for k, v in made.items() if k in names}, ablation=ablation)


def relearn(module: Module, foreign: ImageSet, *, device: torch.device | None = None,
            batch_size: int = 256) -> Module:
    """Continuous learning (docs/method.md, "Continuous learning"): tangling identification again, with
    training inputs of
    classes the module's model never saw; nodes active for them are kept too. No gradient training.

    Each foreign class contributes its first k inputs (k as in TI: N_concerned / (n - 1)), in the documented
    seeded order; MC-BLN's and MC-BI's switching off is applied again as the module's variant asks.
    """
    s = settings_of(module)
    n = module.source.num_classes
    k = tangling_budget(int(module.settings.get("observed", s.ci_samples)), n)
    device = device or module.head_weight.device
    stats = observe(module.source.net, module.graph, module.prepare, foreign, Sampling(k, s.seed),
                    Passes(device, batch_size, progress=False))
    seen = {p.name: stats.any_class(p) for p in stats.points}
    masks = {name: m.cpu() | seen[name] for name, m in module.masks.items()}
    masks = apply_variant(module.graph, masks, module.head_weight.cpu(), s)
    learned = list(module.settings.get("continuous_learning", [])) + [
        {"data": foreign.name, "classes": foreign.class_names, "per_class": k}]
    out = Module(module.source, module.graph, module.concerned, masks, module.head_weight.cpu(),
                 module.head_bias.cpu(), ModuleRecord.of(module, settings={**module.settings,
                                                                           "continuous_learning": learned}))
    # calibrated before relearning: the head and the source's data
    # are unchanged; the in-distribution test measures the activations of the module as it was made
    out.metrics["kept_fraction"] = round(out.kept_fraction(), 6)
    return out.to(device)
