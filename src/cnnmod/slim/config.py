"""How slim modules and merged slim compositions are cut: one typed config (:class:`SlimSettings`), checked once,
and the named recipes (:data:`RECIPES`) that are instances of it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.attention import parse_heads
from ..errors import UserError
from .importance import CHANNEL_COSTS, IMPORTANCES

BUDGETS = ("module", "total")
MODULE_SIZE = 0.5  # a slim module's target size when neither size nor max_loss is given


@dataclass(frozen=True)
class SlimSettings:
    """How slim modules and merged slim compositions are cut (docs/method.md, "Slim modules")."""

    size: float | None = None       # target fraction of the source model's parameters, in (0, 1]; None: the
                                    # job's default (:meth:`resolved`)
    max_loss: float | None = None   # or: stop before losing more than this (pp of held-out binary accuracy)
    step: float = 0.2               # share of the kept parameters one pruning step cuts
    step_samples: int | None = 1024  # inputs each pruning step ranks, re-estimates BatchNorm and refits on (half
                                    # concerned); None: all observed. The last refit always uses all observed
    rule: str = "taylor"            # the channel importance, a name of :data:`~cnnmod.slim.importance.IMPORTANCES`
    scale_epochs: int = 0           # recovery after the last step: a scale per kept channel learned for the
                                    # module's loss (backbone frozen) for this many epochs; 0: none
    scale_bn: bool = False          # with scale_epochs: every BatchNorm layer's scale and shift learned with them
    reconstruct: bool = False       # recovery after the last step, before the scales: every layer's kept weights
                                    # refitted by least squares to give the model's own outputs back
    joint_heads: float = 0.0        # > 0: the heads of a module of every class refitted together, with this
                                    # weight on their composition's cross-entropy; 0: each head alone
    budget: str = "module"          # "module": each module holds at most ``size``; "total": the modules made
                                    # together hold ``size`` on average, channels ranked across them
    cost: str = "params"            # rank channels by importance per what they cost, a name of
                                    # :data:`~cnnmod.slim.importance.CHANNEL_COSTS`: per parameter or per FLOP
    samples: int = 2048             # concerned inputs observed (and as many unconcerned, spread over classes)
    multiple: int = 1               # keep each group's channel count a multiple of this (when above it)
    held_out: int = 50              # held-out inputs per class for max_loss
    seed: int = 0
    heads: str | None = None        # head counts of attention layers that record none and whose count is not
                                    # read off their outputs: "layer=N,layer=N"
    recipe: str | None = None       # the named recipe these came from (:data:`RECIPES`), for the record
    default_size: bool = False      # ``size`` is the default, not asked for: where no step reaches it, the modules
                                    # are cut as far as they go (and the run says so) instead of refused

    @classmethod
    def from_recipe(cls, name: str | None, **given) -> SlimSettings:
        """The named recipe of :data:`RECIPES` (None: the defaults), the fields in ``given`` overriding it."""
        if name is None:
            return cls(**given)
        if name not in RECIPES:
            raise UserError(f"unknown slim recipe {name!r}; use {' or '.join(RECIPES)}")
        return replace(RECIPES[name], **given)

    def resolved(self, default: float) -> SlimSettings:
        """The one place the target size is decided: as given; else, with ``max_loss``, a floor of 0.01 (prune
        as far as the loss allows); else ``default`` (a slim module: :data:`MODULE_SIZE`; a merged composition:
        1.0, no pruning)."""
        if self.size is not None:
            return self
        if self.max_loss is not None:
            return replace(self, size=0.01)
        return replace(self, size=default, default_size=True)

    def check(self) -> None:
        if self.size is not None and not 0 < self.size <= 1:
            raise UserError(f"«size» is a fraction of the model's parameters in (0, 1], got {self.size}")
        if self.max_loss is not None and self.max_loss < 0:
            raise UserError(f"«max_loss» must be >= 0 pp, got {self.max_loss}")
        if self.rule not in IMPORTANCES:
            raise UserError(f"unknown importance rule {self.rule!r}; use {', '.join(IMPORTANCES)}")
        if self.scale_epochs < 0:
            raise UserError(f"«scale_epochs» must be >= 0 (0: no learned channel scales), got {self.scale_epochs}")
        if self.scale_bn and self.scale_epochs == 0:
            raise UserError("«scale_bn» learns BatchNorm's scales and shifts with the channel scales: give "
                            "«scale_epochs» N (N >= 1) too")
        if not self.joint_heads >= 0:
            raise UserError(f"«joint_heads» is the weight of the composition's loss in the heads' joint refit, >= 0 "
                            f"(0: each head alone), got {self.joint_heads}")
        if self.cost not in CHANNEL_COSTS:
            raise UserError(f"unknown slim cost {self.cost!r}; use {' or '.join(CHANNEL_COSTS)}")
        if self.budget not in BUDGETS:
            raise UserError(f"unknown slim budget {self.budget!r}; use module or total")
        if self.budget == "total" and self.max_loss is not None:
            raise UserError("«budget» total shares «size» among the modules; it does not take «max_loss» "
                            "(each module's own floor): give «size», or «budget» module")
        if self.multiple < 1:
            raise UserError(f"«multiple» (keep channel counts a multiple of it) must be at least 1, got "
                            f"{self.multiple}")
        if not 0 < self.step < 1:
            raise UserError(f"«step», the share of the kept parameters a pruning step cuts, must be in (0, 1), "
                            f"got {self.step}")
        if self.step_samples is not None and self.step_samples < 2:
            raise UserError(f"«step_samples» must be at least 2, got {self.step_samples}")
        parse_heads(self.heads)
        if self.samples < 1:
            raise UserError(f"«samples» must be at least 1, got {self.samples}")


# The named recipes (``--recipe``; :mod:`cnnmod.recipes` chooses among them by default), measured on the
# benchmark ResNet-20 on Fashion-MNIST (BENCHMARKS.md, "Slim modules' cost"): fields given beside a recipe
# override it.
RECIPES = {
    # half the parameters, ten modules within 1 pp composed, in about 1 % of the model's training
    "cheap": SlimSettings(size=0.5, rule="fisher", budget="total", step=0.5, step_samples=64, samples=256,
                          reconstruct=True, recipe="cheap"),
    # a quarter of the parameters, ten modules within 1 pp composed, in 18-21 % of the model's training
    "small": SlimSettings(size=0.25, rule="fisher", budget="total", step=0.5, step_samples=256, scale_epochs=3,
                          scale_bn=True, reconstruct=True, joint_heads=3.0, recipe="small"),
}


SMALL_BELOW = 0.5  # the best slim recipe is ``small`` for sizes under this, ``cheap`` from it up
NOT_GIVEN = ("recipe",)  # a recipe's own name is not a setting


def slim_settings(recipe: str | None = None, *, every_class: bool = True, one_process: bool = True,
                  **given) -> SlimSettings:
    """Slim settings: the named recipe, ``given`` fields overriding it. With none named (``best``): ``cheap``
    at ``size`` 0.5 or more (the default size is 0.5), ``small`` below; by ``max_loss``, ``cheap`` with each
    module's own budget. ``best`` fits itself to the run: without ``every_class`` the heads are not refitted
    together (that needs a module of every class), and under torchrun (not ``one_process``) each module is
    pruned alone; without a size asked for, modules of a model whose channels cannot reach the recipe's size are cut
    as far as they go. A recipe named explicitly is taken as it is (and refused where it cannot run)."""
    name = recipe or "best"
    if name != "best" and name not in RECIPES:
        raise UserError(f"«recipe» {name} does not make slim modules; use best, {' or '.join(RECIPES)}")
    if name != "best":
        return replace(RECIPES[name], **given)
    size, max_loss = given.get("size"), given.get("max_loss")
    chosen = "small" if size is not None and size < SMALL_BELOW else "cheap"
    fitted: dict = {}
    if max_loss is not None:
        fitted.update(budget="module", size=None)  # as far as the loss allows (``size`` given: a floor)
    if not every_class:
        fitted["joint_heads"] = 0.0
    if not one_process:
        fitted.update(budget="module", joint_heads=0.0)
    if size is None and max_loss is None:
        fitted["default_size"] = True  # cut as far as it goes where the recipe's size is out of reach
    s = replace(RECIPES[chosen], **{**fitted, **given})
    return s if s.size is not None or s.max_loss is not None else replace(s, size=MODULE_SIZE)


# what a merged composition's own pruning may be told (``compose --size``, ``--max-loss``, ``--set KEY=VALUE``)
PRUNING = ("size", "max_loss", "rule", "reconstruct", "scale_epochs", "scale_bn", "cost", "multiple")


def merged_settings(made: dict, size: float | None = None, max_loss: float | None = None,
                    **given) -> SlimSettings:
    """How slim modules made with the settings ``made`` (one module's record) merge into one network: observed
    on as many inputs, with the same seed. Pruned further only when ``size`` or ``max_loss`` asks (the other
    :data:`PRUNING` fields shape how): Fisher importance, least-squares reconstruction, then channel scales and
    BatchNorm's affine learned for the composition's classes (the recipe measured on the seven pairs of
    BENCHMARKS.md)."""
    unknown = [k for k in given if k not in PRUNING]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a setting of a merged slim composition's pruning; they are: "
                        f"{', '.join(PRUNING)}")
    if size is None and max_loss is None and given:
        raise UserError(f"«{next(iter(given))}» shapes how «size» prunes a merged slim composition: give «size» "
                        "too, or drop it")
    pruning = {} if size is None and max_loss is None else {
        "rule": "fisher", "reconstruct": True, "scale_epochs": 3, "scale_bn": True, **given,
        "size": size, "max_loss": max_loss}
    s = SlimSettings(samples=made.get("samples", 256), seed=made.get("seed", 0), **pruning)
    s.check()
    return s
