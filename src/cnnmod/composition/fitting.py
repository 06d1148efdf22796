"""Fitting modules to the data they will meet, no network weight changed: score calibration (temperature,
Platt) and the in-distribution test at decomposition, recalibration and head refits on a composition's classes
(docs/method.md, "Calibrated scores" and "Refitted heads")."""

from __future__ import annotations

from itertools import chain

import torch

from ..core.calibrate import fit, fit_head, fit_typical, margin
from ..core.observe import class_order
from ..data.dataset import ImageSet
from ..modules.base import BinaryModule
from ..progress import progress_bar
from .voting import Composition


def calibration_set(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """Held-out inputs for calibration: the last ``per_class`` of each class in the observation order, so they
    are disjoint from the observed first N whenever a class has at least N + per_class inputs."""
    order = class_order(data.labels, data.num_classes, seed)
    return data.take(torch.cat([idx[-per_class:] for idx in order]))


@torch.no_grad()
def _module_outputs(modules: list, sets: dict[str, ImageSet], choose, per_class: int, seed: int, batch_size: int,
                    what: str = "margins", advance=None) -> tuple[list, list[torch.Tensor]]:
    """For every module, over the inputs ``choose(data, per_class, seed)`` picks from each of ``sets``: its
    margins ``z_c - z_uc`` (``what`` "margins"; "features": its head's inputs; "layers": the list of its pooled
    activations, :meth:`Composition.group_layers`) and whether each input is its own (of the module's class of
    the module's data set). Modules of one source run in one batched pass; ``advance(n)`` is told of n more
    inputs scored (by every group: each group's batch counts its share)."""
    comp = Composition(modules).eval()
    device = next(chain(comp.buffers(), comp.parameters())).device
    layers, features = what == "layers", what == "features"
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]
    mine: list[list[torch.Tensor]] = [[] for _ in modules]
    for name, data in sets.items():
        chosen = choose(data, per_class, seed)
        source_of = torch.tensor(chosen.source_classes)[chosen.labels]
        for group in comp.groups:
            step = max(8, batch_size // len(group))
            for images in chosen.batches(step):  # decoded in workers when the set is streamed
                images = images.to(device)
                if layers:
                    out = comp.group_layers(group, images)  # K lists of (B, F_l)
                elif features:
                    out = comp.group_features(group, images)  # (K, B, F)
                else:
                    logits = comp.group_logits(group, images)  # (K, B, 2)
                    out = logits[..., 0] - logits[..., 1]
                if advance is not None:
                    advance(len(images) / len(comp.groups))
                for j, i in enumerate(group):
                    outputs[i].append([t.cpu() for t in out[j]] if layers else out[j].cpu())
        for i, m in enumerate(modules):
            mine[i].append((source_of == m.source_class) & (name == m.ref.dataset))
    if layers:
        return [[torch.cat(chunk) for chunk in zip(*o, strict=True)] for o in outputs], [torch.cat(t) for t in mine]
    return [torch.cat(o) for o in outputs], [torch.cat(t) for t in mine]


def calibrate_modules(modules: list, sets: dict[str, ImageSet], per_class: int, seed: int, batch_size: int = 256
                      ) -> None:
    """Fit every module's score calibration (temperature and Platt) on held-out training inputs of ``sets``
    (data set name -> training split, possibly restricted to some classes); an input is the module's own when it
    is of the module's class of the module's data set."""
    margins, mine = _module_outputs(modules, sets, calibration_set, per_class, seed, batch_size)
    for m, margins_m, own in zip(modules, margins, mine, strict=True):
        m.calibration = {**fit(margins_m, own), "per_class": per_class}


def calibrate_decomposition(modules: list, data: ImageSet, per_class: int, seed: int, batch_size: int = 256,
                            show: bool = True) -> None:
    """At decomposition, on the source's training split ``data``: every module's score calibration (as
    :func:`calibrate_modules`, on the last ``per_class`` inputs of each class in the observation order) and its
    in-distribution test (:func:`cnnmod.calibrate.fit_typical`: class statistics from the first ``per_class``,
    the p-values' reference from the calibration inputs). One pass over the calibration inputs serves both: the
    margins are the head's rows applied to the last of its layers."""
    sets = {modules[0].ref.dataset: data}
    observed, heldout = observation_set(data, per_class, seed), calibration_set(data, per_class, seed)
    with progress_bar("calibrating", len(observed) + len(heldout), show) as step:
        fit_on, _ = _module_outputs(modules, sets, lambda *_: observed, per_class, seed, batch_size, "layers", step)
        held, mine = _module_outputs(modules, sets, lambda *_: heldout, per_class, seed, batch_size, "layers", step)
    labels = observed.labels
    for m, f, h, own in zip(modules, fit_on, held, mine, strict=True):
        m.calibration = {**fit(margin(m, h[-1].to(m.head_weight)).cpu(), own), "per_class": per_class}
        m.typical = fit_typical(f, labels, h)


def fitted_on(sets: dict[str, ImageSet]) -> list[str]:
    """The classes a calibration or head refit was fitted on, as ``dataset:indices``."""
    return sorted(f"{n}:{','.join(map(str, d.source_classes))}" for n, d in sets.items())


def observation_set(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """The first ``per_class`` inputs of each class in the observation order: what a module was observed on."""
    order = class_order(data.labels, data.num_classes, seed)
    return data.take(torch.cat([idx[:per_class] for idx in order]))


def refit_heads(modules: list[BinaryModule], sets: dict[str, ImageSet], per_class: int, seed: int,
                batch_size: int = 256, l2: float = 1e-4) -> list[BinaryModule]:
    """Beyond the paper: each module's two-way head refitted on the composition's own classes, from every data
    set in it (``sets`` as for :func:`calibrate_modules`; the first ``per_class`` inputs of each class in the
    observation order, disjoint from the calibration inputs). A monotone recalibration cannot stop a module from
    ranking a foreign image above its own class's images; a new margin direction can. The margin's weights
    ``w_c - w_uc`` are a class-balanced logistic regression ("mine" vs the composition's other classes) on the
    features the module already computes, started from the paper's head; the "not mine" row stays. No weight
    of the network changes; the masks stay."""
    features, mine = _module_outputs(modules, sets, observation_set, per_class, seed, batch_size, "features")
    out = []
    classes = fitted_on(sets)
    for i, m in enumerate(modules):
        w0, b0 = m.head_weight.cpu(), m.head_bias.cpu()
        w, b = fit_head(features[i], mine[i], w0[0] - w0[1], float(b0[0] - b0[1]), l2)
        head_w = torch.stack([w0[1] + w, w0[1]])
        head_b = torch.stack([b0[1] + b, b0[1]])
        settings = {**m.settings, "head_refit": {"fitted_on": classes, "per_class": per_class, "l2": l2}}
        out.append(m.with_head(head_w, head_b, settings))
    return out


