"""Slim modules (docs/method.md, "Slim modules"): a module cut physically to a smaller network, with no retraining.

Every prunable channel group of the source network (:mod:`cnnmod.slim.channels`) gets a gate. A
:class:`~cnnmod.slim.pruner.Pruner` fitted to the module's margin, "class c vs the rest" (the source's own
probability of c distilled, on observed inputs), is pruned by the schedule (:mod:`.schedule`): rank the open
channels by importance per the parameters each costs (:mod:`.importance`), close the least important until a
step's share of the kept parameters is cut, re-estimate BatchNorm and refit the head; until the sliced network
holds at most ``size`` of the source model's parameters (or, with ``max_loss``, until the next step would lose
more than that many points of held-out binary accuracy). Then the recipe's recoveries (:mod:`.recovery`). With
``budget="total"`` the modules of one decomposition are pruned together to ``size`` on average. The sliced
network computes exactly what the gated one does.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..composition.joint import check_every_class, fit_heads_jointly
from ..core.attention import parse_heads
from ..core.calibrate import model_log_odds, source_log_odds
from ..core.layers import copied
from ..core.masking import binary_head
from ..core.observe import class_order, tangling_budget
from ..data.dataset import ImageSet, split_indices
from ..data.registry import split_spec
from ..data.torch_dataset import as_image_set
from ..models.classifier import Classifier
from ..modules.base import ModuleRecord
from ..runtime import Keep
from .channels import frozen_copy
from .config import MODULE_SIZE, SlimSettings
from .module import SlimModule
from .pruner import Margins, Pruner
from .recovery import recover
from .resume import pruned_together
from .schedule import prune


class InputPools:
    """Per class, in a seeded order, the inputs a slim module or merged composition observes and those held out
    to measure its losses (``max_loss``). With the model's validation split recorded in its config and ``data``
    the set it was split from: observed among the images the model was trained on, held out among those it was
    only validated on (``held_out_from="validation"``). Otherwise both from the whole set, held out the last of
    each class's order (``"training"``: the model's weights saw them, so losses show less on them than on new
    images)."""

    def __init__(self, source: Classifier, data: ImageSet, seed: int) -> None:
        order = class_order(data.labels, data.num_classes, seed)
        validated = validation_indices(source, data)
        if validated is None:
            self.observed, self.held = order, [o.flip(0) for o in order]
            self.held_out_from = "training"
        else:
            val = torch.zeros(len(data), dtype=torch.bool)
            val[validated] = True
            self.observed, self.held = [o[~val[o]] for o in order], [o[val[o]] for o in order]
            self.held_out_from = "validation"

    def observation(self, concerned: int, samples: int) -> torch.Tensor:
        """``samples`` concerned inputs and about as many unconcerned, spread evenly over the other classes."""
        n = len(self.observed)
        k = tangling_budget(samples, n)
        return torch.cat([self.observed[concerned][:samples]] +
                         [self.observed[c][:k] for c in range(n) if c != concerned])

    def first(self, classes: list[int], per_class: int) -> torch.Tensor:
        """The first ``per_class`` observed inputs of each of ``classes``."""
        return torch.cat([self.observed[c][:per_class] for c in classes])

    def held_out(self, classes: list[int], per_class: int) -> torch.Tensor:
        """``per_class`` held-out inputs of each of ``classes`` (fewer where a class has fewer)."""
        return torch.cat([self.held[c][:per_class] for c in classes])


def validation_indices(source: Classifier, data: ImageSet) -> torch.Tensor | None:
    """Indices into ``data`` of the images ``source`` was validated on and never trained on, from the split its
    config records, when ``data`` is the training split it was made from (its data set and classes); else None."""
    t = source.info.get("training") or {}
    if not t.get("val_split") or data.split != "train" or "seed" not in t or \
            split_spec(str(t.get("data", "")))[0] != data.name or list(data.source_classes) != source.source_classes:
        return None
    return split_indices(len(data), t["val_split"], t.get("subset"), t["seed"])[1]


def source_margin(head: tuple[torch.Tensor, torch.Tensor], concerned: int) -> tuple[torch.Tensor, float]:
    """The margin z_c - z_uc of the paper's binary head (docs/method.md, "Channeling") on the source's
    classifier, as the
    weights and bias a slim module's head starts from."""
    hw, hb = binary_head(*head, concerned)
    return (hw[0] - hw[1]).cpu(), float(hb[0] - hb[1])


def source_info(source: Classifier) -> dict:
    return {"arch": source.arch, "arch_args": source.arch_args, "dataset": source.dataset,
            "class_names": source.class_names, "source_classes": source.source_classes,
            "weights_sha256": source.info.get("weights_sha256"),
            "params": sum(p.numel() for p in source.net.parameters())}


SHARED_ODDS = 2 ** 26  # slim_modules computes the source's log-odds once for all modules up to this many values


def slim_modules(source: Classifier, data: ImageSet, classes: list[int], s: SlimSettings, batch_size: int = 256,
                 done=None, keep: Keep | None = None) -> list:
    """The slim modules of ``classes``, each as :func:`slim_module` makes it, with the work they share done once:
    the source's probabilities on the observed inputs (one forward pass over every distinct input any class's
    module observes, so that modules made together or apart are the same; :func:`slim_module` alone computes
    them on its own inputs, the same up to rounding). With ``budget="total"`` they are pruned together
    (:func:`~.schedule.prune_together`). With ``joint_heads``, once all are made their heads are refitted together
    (:func:`refit_heads_together`; ``classes`` must then be every class). ``done(module)`` is called as each is
    made. ``keep``: each module kept once made, and each step of pruning together (:mod:`.resume`); the modules
    and steps an earlier run kept there are not made again."""
    s = s.resolved(MODULE_SIZE)
    s.check()
    data = as_image_set(data)
    check_joint(s, classes, source.num_classes)
    device = next(source.net.parameters()).device
    finished = {c: m for c in classes if keep is not None and (m := keep.module(c, device)) is not None}
    todo = [c for c in classes if c not in finished]
    teachers: dict[int, torch.Tensor] = {}
    known = None  # the source's log-odds on every observed input, when computed here: (indices, odds)
    if classes:
        started = time.perf_counter()
        pools = InputPools(source, data, s.seed)
        # every class's observed inputs, whichever are asked for: the same passes, so the same bits, whether the
        # modules are made together, apart or spread over torchrun's processes
        observed = {c: pools.observation(c, s.samples) for c in range(data.num_classes)}
        union = torch.unique(torch.cat(list(observed.values())))
        if union.numel() * data.num_classes <= SHARED_ODDS and (todo or s.joint_heads > 0):
            odds = model_log_odds(source, data.images[union], batch_size)
            known = union, odds
            seconds = (time.perf_counter() - started) / max(len(todo), 1)  # each module's share
            teachers = {c: (torch.sigmoid(odds[torch.searchsorted(union, observed[c]), c:c + 1]), seconds)
                        for c in todo}
    making = iter(())
    if todo:  # the graph, channel groups and their costs are one network's, whichever module's
        frozen = frozen_copy(source.net, source.spec.shape, parse_heads(s.heads))
    if todo and s.budget == "total" and len(classes) > 1:
        makings = [ModuleMaker(source, data, c, s, batch_size, teachers.get(c), frozen) for c in todo]
        started = time.perf_counter()
        histories = pruned_together({m.concerned: m.pruner for m in makings}, s.size, keep, bool(finished))
        shared = (time.perf_counter() - started) / len(makings)  # each module's share of the joint pruning

        def made(m: ModuleMaker) -> SlimModule:
            m.started = time.perf_counter() - m.setup - shared  # its own setup, its share of the pruning
            recover(m.pruner)
            return m.module(histories[m.concerned])
        making = (made(m) for m in makings)
    elif todo:
        making = (slim_module(source, data, c, s, batch_size, teacher=teachers.get(c), frozen=frozen) for c in todo)
    modules = []
    for c in classes:
        module = finished.get(c)
        if module is None:
            module = next(making)
            if keep is not None:
                keep.keep_module(module)
        modules.append(module)
        if done is not None:
            done(module)
    if s.joint_heads > 0:
        started = time.perf_counter()
        fit = refit_heads_together(modules, source, data, s, batch_size, known)
        share = (time.perf_counter() - started) / len(modules)  # each module's share of the joint refit
        for m in modules:
            m.settings["seconds"] = round(m.settings["seconds"] + share, 3)
            m.metrics["joint_heads"] = fit
    return modules


def check_joint(s: SlimSettings, classes: list[int], num_classes: int) -> None:
    """``joint_heads`` refits the heads of a module of every class: say so, before anything runs, when
    ``classes`` are fewer."""
    if s.joint_heads > 0:
        check_every_class(classes, num_classes)


def refit_heads_together(modules: list[SlimModule], source: Classifier, data: ImageSet, s: SlimSettings,
                         batch_size: int = 256, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """The heads of ``modules`` (one of every class of ``source``) refitted together with weight ``s.joint_heads``
    on their composition's cross-entropy (:func:`cnnmod.composition.joint.fit_heads_jointly`), on half as many
    observed inputs of every class as a module observes of its own (:class:`InputPools`: never a validation image).
    ``known``: the source's log-odds already computed on inputs of ``data`` (sorted indices, (N, K) odds), as
    :func:`slim_modules` has them; those inputs are then not run through the source again."""
    index = InputPools(source, data, s.seed).first(list(range(data.num_classes)), max(s.samples // 2, 1))
    odds = None
    if known is not None:
        where = torch.searchsorted(known[0], index).clamp(max=known[0].numel() - 1)
        if bool((known[0][where] == index).all()):
            odds = known[1][where]
    return fit_heads_jointly(modules, source, data, index, s.joint_heads, batch_size=batch_size, odds=odds)


class ModuleMaker:
    """One slim module in the making: its observed inputs, its :class:`Pruner` (refreshed once: BatchNorm
    statistics and head on its inputs), its held-out inputs for ``max_loss``; :meth:`prune` runs the schedule and
    :meth:`module` makes the :class:`SlimModule` once the pruner is done (the pruner then still holds the gated
    network the module was cut from). ``teacher``: the source's p_c on the observed inputs and the seconds it
    took, when computed for several modules at once; ``frozen``: :func:`frozen_copy` of the source, shared by
    several makers (each prunes its own copy of the network)."""

    def __init__(self, source: Classifier, data: ImageSet, concerned: int, s: SlimSettings, batch_size: int = 256,
                 teacher: tuple[torch.Tensor, float] | None = None, frozen: tuple | None = None) -> None:
        self.source, self.concerned, self.s = source, concerned, s
        self.started = time.perf_counter() - (teacher[1] if teacher is not None else 0.0)
        if frozen is None:
            frozen = frozen_copy(source.net, source.spec.shape, parse_heads(s.heads))
        else:
            frozen = (frozen[0], copied(frozen[1]), frozen[2])
        self.graph, self.net, _ = frozen
        device = next(self.net.parameters()).device
        self.pools = InputPools(source, data, s.seed)
        observed = self.pools.observation(concerned, s.samples)
        images, targets = data.images[observed], data.labels[observed] == concerned
        x_obs = source.prepare(images.to(device))
        if teacher is not None:
            soft = teacher[0].to(device)
        else:  # the source's p_c, before any BatchNorm statistics change
            soft = torch.sigmoid(source_log_odds(self.net, x_obs, batch_size)[:, concerned:concerned + 1])
        w, b = source_margin(self.graph.head.linear_map(self.net), concerned)
        margins = Margins(x_obs, targets.to(device)[:, None], soft, w[None], torch.tensor([b]))
        self.pruner = Pruner(source, s, margins, batch_size, frozen)
        self.held = None
        if s.max_loss is not None:
            self.held = self.pools.held_out(list(range(data.num_classes)), s.held_out)
            self.x_held, self.y_held = source.prepare(data.images[self.held].to(device)), data.labels[self.held]
        self.pruner.refresh()
        self.base_accuracy = self.accuracy() if self.held is not None else None
        self.setup = time.perf_counter() - self.started  # seconds so far, the share of the source's odds with it

    def accuracy(self) -> float:
        """Binary accuracy ("mine or not") on the held-out inputs."""
        return self.pruner.top1(self.x_held, self.y_held, [self.concerned])

    def prune(self) -> list[dict]:
        """The schedule down to the settings' size (or max_loss, on the held-out inputs) and the recoveries; the
        history of the way down."""
        return prune(self.pruner, self.accuracy if self.held is not None else None)

    def module(self, history: list[dict]) -> SlimModule:
        p, source, s = self.pruner, self.source, self.s
        sliced = p.sliced(check=True)
        info = source_info(source)
        params = sum(q.numel() for q in sliced.parameters())
        held_metrics = {} if self.held is None else {
            "held_out_binary_accuracy_start": self.base_accuracy, "held_out_binary_accuracy": self.accuracy(),
            "held_out_images": len(self.held), "held_out_from": self.pools.held_out_from}
        metrics = {**held_metrics, "params": params, "params_fraction": round(params / p.total_params, 4),
                   "kept_channels": p.kept_channels(),
                   "channels": p.channels, "history": history, **p.layout()}
        settings = {**asdict(s), "granularity": "channel", "seconds": round(time.perf_counter() - self.started, 3)}
        module = SlimModule(sliced, self.graph.head.sliced_layer, source.spec, source.class_names[self.concerned],
                            self.concerned, info, p.removed(), ModuleRecord(settings, metrics))
        return module.eval()


def slim_module(source: Classifier, data: ImageSet, concerned: int, s: SlimSettings, batch_size: int = 256,
                teacher: tuple[torch.Tensor, float] | None = None, frozen: tuple | None = None) -> SlimModule:
    """One slim module of ``source`` for class ``concerned``, observed on ``data`` (its training split); ``teacher``
    and ``frozen`` as :class:`ModuleMaker` takes them."""
    s = s.resolved(MODULE_SIZE)
    s.check()
    maker = ModuleMaker(source, as_image_set(data), concerned, s, batch_size, teacher, frozen)
    return maker.module(maker.prune())


