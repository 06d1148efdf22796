"""Slim modules (docs/method.md, "Slim modules"): a module cut physically to a smaller network, with no retraining.

Every prunable channel group of the source network (see :mod:`cnnmod.channels`) gets a gate. A
:class:`Pruner` closes gates iteratively for K binary margins at once (a slim module: one, "class c vs the
rest"; a merged composition: one per class, against the composition's other classes):

1. rank the open channels by their importance to the margins: the first-order (gradient x gate) effect on
   the margins' class-balanced binary loss, distilled from the source's probabilities or fitted to labels
   (``rule="taylor"``), or the same effect's second order, each input's own gradient squared (the gate's
   empirical Fisher information, ``rule="fisher"``), or, as the post-hoc baseline of MODA and MwT, how often
   they are active for the margins' own inputs (``rule="activation"``); per the parameters or FLOPs each
   channel costs (``cost``);
2. close the least important until ``step`` of the kept parameters are cut (never below ``size``; at
   least one channel of every group stays);
3. re-estimate BatchNorm statistics and refit the head rows on the observation data.

until the physically sliced network holds at most ``size`` of the source model's parameters (or, with
``max_loss``, until the next step would lose more than that many points of binary accuracy on held-out
data). With ``rule="gates"`` the first cut is learned instead (:meth:`Pruner.learn_gates`: gates in [0, 1]
trained for the margins with a cost penalty), later steps ranked as taylor. With ``budget="total"`` the modules
of one decomposition are pruned together to ``size`` on average (:func:`prune_together`). The backbone's
weights are never trained on a loss; with ``reconstruct``, after the last step each layer's kept weights are
solved by least squares to give the model's own outputs back (:meth:`Pruner.reconstruct`). The sliced network
computes exactly what the gated one does.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..composition.joint import check_every_class, fit_heads_jointly
from ..core.calibrate import model_log_odds, source_log_odds
from ..core.channels import frozen_copy
from ..core.masking import binary_head
from ..core.observe import class_order, tangling_budget
from ..data.dataset import ImageSet
from ..data.registry import split_spec
from ..data.torch_dataset import as_image_set
from ..errors import UserError
from ..models.classifier import Classifier
from ..models.train import split_indices
from .merged import MergedSlim
from .module import SlimModule
from .pruner import IMPORTANCE, Pruner, prune_together

COSTS = ("params", "flops", "both", "none")
MODULE_SIZE = 0.5  # a slim module's target size when neither --size nor --max-loss is given
# named recipes (``--slim-recipe``): the measured settings of BENCHMARKS.md's "Slim modules' cost" for the
# ResNet-20 (BatchNorm) on Fashion-MNIST, as SlimSettings fields; flags given beside a recipe override its fields
RECIPES = {
    # half the parameters, ten modules within 1 pp in 1.0-1.4 % of the model's training (three seeds: -0.29 to
    # -0.58 pp with Fisher importance, -0.54 to -0.88 with Taylor's)
    "cheap": {"size": 0.5, "rule": "fisher", "budget": "total", "step": 0.5, "step_samples": 64, "samples": 256,
              "reconstruct": True},
    # a quarter of the parameters, ten modules within 1 pp (-0.85 / -0.72 / -0.97 over three seeds), 18-21 % of
    # training (learned gates instead of Fisher's cut: -0.78 to -1.00, 40-59 %)
    "small": {"size": 0.25, "rule": "fisher", "budget": "total", "step": 0.5, "step_samples": 256,
              "scale_epochs": 3, "scale_bn": True, "reconstruct": True, "joint_heads": 3.0},
}
# a merged composition's own pruning steps: as its figures in BENCHMARKS.md were measured (the cheaper steps of
# slim modules were measured on modules only)
MERGED_STEPS = {"step": 0.1, "step_samples": None}


@dataclass(frozen=True)
class SlimSettings:
    """How slim modules and merged slim compositions are cut; checked once (:meth:`check`)."""

    size: float | None = None       # target fraction of the source model's parameters, in (0, 1]; None: the
                                    # job's default (:meth:`resolved`)
    max_loss: float | None = None   # or: stop before losing more than this (pp of held-out binary accuracy)
    step: float = 0.2               # fraction of kept parameters (or channels) closed per iteration
    step_samples: int | None = 1024  # inputs each pruning step ranks, re-estimates BatchNorm and refits on (half
                                    # concerned); None: all observed. The last refit always uses all observed
    rule: str = "taylor"            # "taylor", "fisher", "gates" (learned: gate_epochs, gate_lr) or "activation"
    gate_epochs: int = 10           # rule "gates": epochs over the step's inputs
    gate_lr: float = 0.05           # rule "gates": Adam's step on the gate scores (the head's: a tenth)
    scale_epochs: int = 0           # after the last step: a scale per kept channel learned for the module's loss
                                    # (backbone frozen) for this many epochs over every observed input; 0: none
    scale_bn: bool = False          # with scale_epochs: learn every BatchNorm layer's scale and shift with them
    reconstruct: bool = False       # after the last step, before the scales: every layer's kept weights refitted
                                    # by least squares so that its outputs match the model's own on observed
                                    # inputs (:meth:`Pruner.reconstruct`)
    joint_heads: float = 0.0        # > 0: the heads of a module of every class, made together, refitted together,
                                    # with this weight on their composition's cross-entropy (:mod:`.joint`); 0: each
                                    # head alone
    budget: str = "module"          # "module": each module holds at most ``size``; "total": the modules made
                                    # together hold ``size`` on average, channels ranked across them
    objective: str = "distill"      # the binary loss ranked and refitted on: the source's p_c ("distill") or labels
    cost: str = "params"            # rank channels by importance per what they cost: params, flops, both (the sum
                                    # of their shares of each), or none (rank within each group)
    samples: int = 2048             # concerned inputs observed (and as many unconcerned, spread over classes)
    multiple: int = 1               # keep each group's channel count a multiple of this (when above it)
    held_out: int = 50              # held-out inputs per class for max_loss
    seed: int = 0
    recipe: str | None = None       # the named recipe these came from (:data:`RECIPES`), for the record

    @classmethod
    def from_recipe(cls, name: str | None, **given) -> SlimSettings:
        """Settings from the named recipe of :data:`RECIPES` (None: the defaults), the fields in ``given`` (those a
        user set explicitly) overriding it; the recipe's name recorded."""
        if name is None:
            return cls(**given)
        if name not in RECIPES:
            raise UserError(f"unknown slim recipe {name!r}; use {' or '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **given, "recipe": name})

    def resolved(self, default: float) -> SlimSettings:
        """The one place the target size is decided: as given; else, with ``max_loss``, a floor of 0.01 (prune
        as far as the loss allows); else ``default`` (a slim module: :data:`MODULE_SIZE`; a merged composition:
        1.0, no pruning)."""
        if self.size is not None:
            return self
        return replace(self, size=0.01 if self.max_loss is not None else default)

    def check(self) -> None:
        if self.size is not None and not 0 < self.size <= 1:
            raise UserError(f"--size is a fraction of the model's parameters in (0, 1], got {self.size}")
        if self.max_loss is not None and self.max_loss < 0:
            raise UserError(f"--max-loss must be >= 0 pp, got {self.max_loss}")
        if self.rule not in IMPORTANCE:
            raise UserError(f"unknown importance rule {self.rule!r}; use {', '.join(IMPORTANCE)}")
        if self.gate_epochs < 1 or self.gate_lr <= 0:
            raise UserError("learned gates need --gate-epochs >= 1 and a positive gate learning rate")
        if self.scale_epochs < 0:
            raise UserError(f"--scale-epochs must be >= 0 (0: no learned channel scales), got {self.scale_epochs}")
        if self.scale_bn and self.scale_epochs == 0:
            raise UserError("--scale-bn learns BatchNorm's scales and shifts with the channel scales: give "
                            "--scale-epochs N (N >= 1) too")
        if not self.joint_heads >= 0:
            raise UserError(f"--joint-heads is the weight of the composition's loss in the heads' joint refit, >= 0 "
                            f"(0: each head alone), got {self.joint_heads}")
        if self.objective not in ("distill", "labels"):
            raise UserError(f"unknown slim objective {self.objective!r}; use distill or labels")
        if self.cost not in COSTS:
            raise UserError(f"unknown slim cost {self.cost!r}; use {', '.join(COSTS)}")
        if self.budget not in ("module", "total"):
            raise UserError(f"unknown slim budget {self.budget!r}; use module or total")
        if self.budget == "total" and self.max_loss is not None:
            raise UserError("--slim-budget total shares --size among the modules; it does not take --max-loss "
                            "(each module's own floor): give --size, or --slim-budget module")
        if self.multiple < 1:
            raise UserError(f"the channel multiple must be at least 1, got {self.multiple}")
        if not 0 < self.step < 1:
            raise UserError(f"--slim-step, the share of the kept parameters a pruning step cuts, must be in (0, 1), "
                            f"got {self.step}")
        if self.step_samples is not None and self.step_samples < 2:
            raise UserError(f"--slim-step-samples must be at least 2, got {self.step_samples}")


class Pools:
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


def _source_margin(head: tuple[torch.Tensor, torch.Tensor], concerned: int) -> tuple[torch.Tensor, float]:
    """The margin z_c - z_uc of the paper's binary head (docs/method.md, "Channeling") on the source's
    classifier, as the
    weights and bias a slim module's head starts from."""
    hw, hb = binary_head(*head, concerned)
    return (hw[0] - hw[1]).cpu(), float(hb[0] - hb[1])


def _source_info(source: Classifier) -> dict:
    return {"arch": source.arch, "arch_args": source.arch_args, "dataset": source.dataset,
            "class_names": source.class_names, "source_classes": source.source_classes,
            "weights_sha256": source.info.get("weights_sha256"),
            "params": sum(p.numel() for p in source.net.parameters())}


SHARED_ODDS = 2 ** 26  # slim_modules computes the source's log-odds once for all modules up to this many values


def slim_modules(source: Classifier, data: ImageSet, classes: list[int], s: SlimSettings, batch_size: int = 256,
                 done=None) -> list:
    """The slim modules of ``classes``, each as :func:`slim_module` makes it, with the work they share done once:
    the source's probabilities on the observed inputs (one forward pass over every distinct input any class's
    module observes, so that modules made together or apart are the same; :func:`slim_module` alone computes
    them on its own inputs, the same up to rounding). With ``budget="total"`` they are pruned together
    (:func:`prune_together`). With ``joint_heads``, once all are made their heads are refitted together
    (:func:`refit_heads_together`; ``classes`` must then be every class). ``done(module)`` is called as each is
    made."""
    s = s.resolved(MODULE_SIZE)
    s.check()
    data = as_image_set(data)
    check_joint(s, classes, source.num_classes)
    teachers: dict[int, torch.Tensor] = {}
    known = None  # the source's log-odds on every observed input, when computed here: (indices, odds)
    if s.objective == "distill" and classes:
        started = time.perf_counter()
        pools = Pools(source, data, s.seed)
        # every class's observed inputs, whichever are asked for: the same passes, so the same bits, whether the
        # modules are made together, apart or spread over torchrun's processes
        observed = {c: pools.observation(c, s.samples) for c in range(data.num_classes)}
        union = torch.unique(torch.cat(list(observed.values())))
        if union.numel() * data.num_classes <= SHARED_ODDS:
            odds = model_log_odds(source, data.images[union], batch_size)
            known = union, odds
            seconds = (time.perf_counter() - started) / len(classes)  # each module's share
            teachers = {c: (torch.sigmoid(odds[torch.searchsorted(union, observed[c]), c:c + 1]), seconds)
                        for c in classes}
    frozen = frozen_copy(source.net, source.spec.shape)  # graph, channel groups and their costs: one network's, whichever module's
    if s.budget == "total" and len(classes) > 1:
        makings = [_Making(source, data, c, s, batch_size, teachers.get(c), frozen) for c in classes]
        started = time.perf_counter()
        histories = prune_together([m.pruner for m in makings], s.size)
        shared = (time.perf_counter() - started) / len(makings)  # each module's share of the joint pruning

        def made(m: _Making, history: list[dict]) -> SlimModule:
            m.started = time.perf_counter() - m.setup - shared  # its own setup, its share of the pruning
            return m.module(history)
        making = (made(m, h) for m, h in zip(makings, histories, strict=True))
    else:
        making = (slim_module(source, data, c, s, batch_size, teacher=teachers.get(c), frozen=frozen) for c in classes)
    modules = []
    for module in making:
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
    observed inputs of every class as a module observes of its own (:class:`Pools`: never a validation image).
    ``known``: the source's log-odds already computed on inputs of ``data`` (sorted indices, (N, K) odds), as
    :func:`slim_modules` has them; those inputs are then not run through the source again."""
    index = Pools(source, data, s.seed).first(list(range(data.num_classes)), max(s.samples // 2, 1))
    odds = None
    if known is not None:
        where = torch.searchsorted(known[0], index).clamp(max=known[0].numel() - 1)
        if bool((known[0][where] == index).all()):
            odds = known[1][where]
    return fit_heads_jointly(modules, source, data, index, s.joint_heads, batch_size=batch_size, odds=odds)


class _Making:
    """One slim module in the making: its observed inputs, its :class:`Pruner` (refreshed once: BatchNorm
    statistics and head on its inputs), its held-out inputs for ``max_loss``; :meth:`module` makes the
    :class:`SlimModule` once the pruner is done."""

    def __init__(self, source: Classifier, data: ImageSet, concerned: int, s: SlimSettings, batch_size: int,
                 teacher: tuple[torch.Tensor, float] | None, frozen: tuple | None) -> None:
        self.source, self.concerned, self.s = source, concerned, s
        self.started = time.perf_counter() - (teacher[1] if teacher is not None else 0.0)
        if frozen is None:
            frozen = frozen_copy(source.net, source.spec.shape)
        else:
            frozen = (frozen[0], copy.deepcopy(frozen[1]), frozen[2])
        self.graph, self.net, _ = frozen
        device = next(self.net.parameters()).device
        self.pools = Pools(source, data, s.seed)
        observed = self.pools.observation(concerned, s.samples)
        images, targets = data.images[observed], data.labels[observed] == concerned
        x_obs = source.prepare(images.to(device))
        soft = None
        if teacher is not None and s.objective == "distill":
            soft = teacher[0].to(device)
        elif s.objective == "distill":  # the source's p_c, before any BatchNorm statistics change
            soft = torch.sigmoid(source_log_odds(self.net, x_obs, batch_size)[:, concerned:concerned + 1])
        w, b = _source_margin(self.graph.head.linear_map(self.net), concerned)
        self.pruner = Pruner(source, s, x_obs, targets.to(device)[:, None], soft, w[None], torch.tensor([b]),
                             batch_size, frozen)
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

    def module(self, history: list[dict], keep_reference: bool = False) -> SlimModule:
        p, source, s = self.pruner, self.source, self.s
        sliced = p.sliced(True, check=True)
        info = _source_info(source)
        params = sum(q.numel() for q in sliced.parameters())
        held_metrics = {} if self.held is None else {
            "held_out_binary_accuracy_start": self.base_accuracy, "held_out_binary_accuracy": self.accuracy(),
            "held_out_images": len(self.held), "held_out_from": self.pools.held_out_from}
        metrics = {**held_metrics, "params": params, "params_fraction": round(params / p.total_params, 4),
                   "kept_channels": p.kept_channels(),
                   "channels": p.channels, "history": history}
        settings = {**asdict(s), "granularity": "channel", "seconds": round(time.perf_counter() - self.started, 3)}
        module = SlimModule(sliced, self.graph.head.sliced_layer, source.spec, source.class_names[self.concerned],
                            self.concerned, info, p.removed(), settings, metrics)
        if keep_reference:  # the network it was cut from, gated (the full model's where not narrowed): for checks
            module.gated_reference = (p.net, self.graph, p.groups, [g.clone() for g in p.gates], *p.head(True))
        return module.eval()


def slim_module(source: Classifier, data: ImageSet, concerned: int, s: SlimSettings,
                batch_size: int = 256, keep_reference: bool = False,
                teacher: tuple[torch.Tensor, float] | None = None, frozen: tuple | None = None) -> SlimModule:
    """One slim module of ``source`` for class ``concerned``, observed on ``data`` (its training split).
    ``keep_reference`` keeps the gated full network it was cut from as ``gated_reference``, for checks.
    ``teacher``: the source's p_c on the observed inputs and the seconds it took, as :func:`slim_modules`
    computes them for several modules at once; ``frozen``: :func:`frozen_copy` of the source, shared by its
    modules (each prunes its own copy of the network)."""
    s = s.resolved(MODULE_SIZE)
    s.check()
    making = _Making(source, as_image_set(data), concerned, s, batch_size, teacher, frozen)
    history = making.pruner.prune(True, making.accuracy if making.held is not None else None)
    return making.module(history, keep_reference)


def as_made(modules: list[SlimModule], **overrides) -> SlimSettings:
    """Settings to merge slim modules as they were made: as many observed inputs, the same seed and objective;
    ``overrides`` (the fields of :meth:`cnnmod.jobs.compose.ComposeSettings.pruning`) shape the merged network's
    own pruning."""
    made = modules[0].settings
    return SlimSettings(samples=made.get("samples", 256), seed=made.get("seed", 0),
                        objective=made.get("objective", "labels"), **overrides)


def merge_slim(modules: list[SlimModule], source: Classifier, data: ImageSet, settings: SlimSettings, *,
               held_per_class: int = 1000, foreign: list[ImageSet] | None = None,
               batch_size: int = 256) -> MergedSlim:
    """Merge slim modules of ``source`` into one network (the union of their kept channels) and refit every
    class's head row on it: class c against the composition's other classes (the composition's world: inputs of
    its classes, ``settings.samples`` of each from ``data``, the source's training split), to the source's p_c
    among them (``objective="distill"``) or to the labels. With ``settings.size``, channels are then closed, as
    for a slim module (ranked by ``cost``), until the network holds at most that share of the model's
    parameters; with ``max_loss``, until the next step would put its top-1 among its classes more than that many
    points under the model's restricted to them, on ``held_per_class`` held-out inputs of each class
    (:class:`Pools`; ``size`` is then a floor). ``foreign``: for a fused composition
    (:class:`cnnmod.slim.merged.FusedSlim`), the training images of the classes it takes from other models (one
    set per data set, restricted to those classes): ``samples`` of each of their classes are observed too, as
    inputs of none of this network's classes, so that its scores stay low on them (BatchNorm statistics still
    come from its own classes' inputs). The backbone is not trained."""
    if not modules:
        raise UserError("nothing to merge: no modules")
    sha = source.info.get("weights_sha256")
    if any(m.source_info.get("weights_sha256") != sha for m in modules):
        raise UserError("--mode merged needs slim modules of one source model; these come from several")
    started = time.perf_counter()
    size, max_loss, samples, seed, objective = (settings.size, settings.max_loss, settings.samples, settings.seed,
                                                settings.objective)
    s = replace(settings.resolved(1.0), **MERGED_STEPS)
    s.check()
    frozen = frozen_copy(source.net, source.spec.shape)
    graph, net, groups = frozen
    device = next(net.parameters()).device
    gates = []
    for g in groups.groups:
        gate = torch.zeros(g["channels"], device=device)
        for m in modules:
            kept = torch.ones(g["channels"], dtype=torch.bool)
            kept[m.removed.get(g["roots"][0], [])] = False
            gate[kept.to(device)] = 1.0
        gates.append(gate)
    chosen = [m.concerned for m in modules]
    world = chosen if len(chosen) > 1 else list(range(data.num_classes))  # one class alone: against all
    pools = Pools(source, data, seed)
    idx = pools.first(world, samples)
    x_obs = source.prepare(data.images[idx].to(device))
    targets = data.labels[idx].to(device)[:, None] == torch.tensor(chosen, device=device)[None, :]
    soft = None
    if objective == "distill":
        odds = source_log_odds(net, x_obs, batch_size, world)
        soft = torch.sigmoid(odds[:, [world.index(c) for c in chosen]])
    own = x_obs.shape[0]
    for f in foreign or []:
        order = class_order(f.labels, f.num_classes, seed)
        x_obs = torch.cat([x_obs, source.prepare(f.images[torch.cat([o[:samples] for o in order])].to(device))])
    if x_obs.shape[0] > own:  # none of them is of this network's classes
        targets = torch.cat([targets, targets.new_zeros(x_obs.shape[0] - own, len(chosen))])
        soft = torch.cat([soft, soft.new_zeros(x_obs.shape[0] - own, len(chosen))]) if soft is not None else None
    margins = [_source_margin(graph.head.linear_map(net), c) for c in chosen]
    p = Pruner(source, s, x_obs, targets, soft, torch.stack([w for w, _ in margins]),
               torch.tensor([b for _, b in margins]), batch_size, frozen, gates, bn_rows=own)
    if max_loss is not None:
        held = pools.held_out(world, held_per_class)
        x_held, y_held = source.prepare(data.images[held].to(device)), data.labels[held]
        model_odds = source_log_odds(net, x_held, batch_size, world)[:, [world.index(c) for c in chosen]].cpu()

    def top1(z: torch.Tensor | None = None) -> float:
        return p.top1(x_held, y_held, chosen, z)

    pruning = size is not None or max_loss is not None
    p.refresh()  # MERGED_STEPS: on every observed input
    # the reference is the model restricted to the composition's classes: a union that already loses more than
    # max_loss against it is not pruned further
    start = top1(model_odds) if max_loss is not None else None
    history = p.prune(False, top1 if max_loss is not None else None, start) if pruning else []
    sliced = p.sliced(False, check=True)
    info = _source_info(source)
    params = sum(q.numel() for q in sliced.parameters())
    held_metrics = {} if start is None else {"held_out_model_top1": start, "held_out_top1": top1(),
                                             "held_out_images": len(y_held), "held_out_from": pools.held_out_from}
    metrics = {**held_metrics, "params": params, "params_fraction": round(params / info["params"], 4),
               "kept_channels": p.kept_channels(),
               "channels": p.channels, "history": history}
    recorded = {"granularity": "channel", "mode": "merged", "samples": samples, "seed": seed, "objective": objective,
                "world": [info["source_classes"][c] for c in world],
                "foreign": [f"{f.name}:{','.join(map(str, f.source_classes))}" for f in foreign or []],
                "size": size, "max_loss": max_loss, "cost": s.cost, "multiple": s.multiple,
                "reconstruct": s.reconstruct, "rule": s.rule, "scale_epochs": s.scale_epochs, "scale_bn": s.scale_bn,
                "seconds": round(time.perf_counter() - started, 3)}
    return MergedSlim(sliced, graph.head.sliced_layer, source.spec, chosen, info, p.removed(), recorded, metrics).eval()
