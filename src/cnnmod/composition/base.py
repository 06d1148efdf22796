"""The composition contract: uint8 images in, one score p_c per class out, whatever runs inside.

Three kinds implement it: :class:`cnnmod.composition.voting.Composition` (the paper's voting over modules, and
``mode="merged"`` for node-level modules of one model), :class:`cnnmod.slim.merged.MergedSlim` (slim modules
of one model as one network) and :class:`cnnmod.slim.merged.FusedSlim` (merged slim networks of several
models side by side). Evaluation, cost, export and the study take any :class:`Composer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..modules.base import ClassRef
from ..modules.kinds import kinds


def vote(scores: torch.Tensor) -> torch.Tensor:
    """The winning column of each row of ``scores`` (B, K) under the voting rule (docs/method.md,
    "Composition"): exactly one voter (p_c > 0.5) wins; among several the highest p_c; with none the highest
    p_c. Ties go to the lower index."""
    voters = scores > 0.5
    among_voters = torch.where(voters, scores, torch.full_like(scores, float("-inf"))).argmax(1)
    return torch.where(voters.any(1), among_voters, scores.argmax(1))


class Composer(nn.Module, ABC):
    """A classifier over some classes, made of modules: ``forward`` takes uint8 images (B, C, H, W) and returns
    scores p_c (B, K), one column per class of :attr:`refs`; :meth:`predict` applies the voting rule."""

    mode: str = "vote"          # how it runs: "vote", "merged" or "fused"
    calibration: str = "none"   # how its scores are compared (see cnnmod.core.calibrate)

    @property
    @abstractmethod
    def refs(self) -> list[ClassRef]:
        """Its classes, in column order."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, int, int]: ...

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def params(self) -> int:
        """Parameters it needs to run."""

    @abstractmethod
    def kept_fractions(self) -> list[float]:
        """Per class, what its module keeps of its source model (nodes or parameters)."""

    @property
    def sources(self) -> list:
        """The source models it holds (:class:`cnnmod.models.classifier.Classifier`); none for slim networks,
        which run without them."""
        return []

    @property
    @abstractmethod
    def source_shas(self) -> list[str | None]:
        """Per class, the sha256 of the weights of the model its module was made from."""

    @property
    def variant(self) -> str:
        """How its modules were made: the decomposition variant (mc, mc-bln, mc-bi) or "channel" (slim)."""
        return "channel"

    @property
    def passes(self) -> int:
        """Model passes per image in its largest batched pass (batch sizes are divided by it)."""
        return 1

    def separately(self) -> list[tuple[Hashable, Composer]] | None:
        """Where every column depends on one part alone (voting), each column as a composer of its own with a
        key naming that part, so that an evaluation can reuse a column's scores across compositions; else None."""
        return None

    def pairwise_jaccard(self) -> float | None:
        """The mean Jaccard index over pairs of its classes' modules, where that is defined."""
        return None

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return vote(self.forward(images))

    # derived from refs
    @property
    def classes(self) -> list[int]:
        """The source data sets' class indices, in column order."""
        return [r.source_class for r in self.refs]

    @property
    def class_names(self) -> list[str]:
        return [r.name for r in self.refs]

    @property
    def datasets(self) -> list[str]:
        return [r.dataset for r in self.refs]

    @property
    def qualified_names(self) -> list[str]:
        return [r.qualified for r in self.refs]


def find_class(refs: Sequence[ClassRef], text: str) -> int:
    """The position of the class a ``--class`` names among ``refs``: ``dataset:name``, ``dataset:index``, a
    class name, or an index of the data set's classes."""
    text = text.strip()
    dataset, sep, rest = text.rpartition(":")
    candidates = []
    for i, r in enumerate(refs):
        if sep and dataset != r.dataset:
            continue
        what = rest if sep else text
        if what == r.name or (what.isdigit() and int(what) == r.source_class):
            candidates.append(i)
    if not candidates:
        raise UserError(f"the composition has no class {text!r}; its classes are "
                        f"{', '.join(r.qualified for r in refs)}")
    if len(candidates) > 1:
        raise UserError(f"«cls» {text!r} matches {len(candidates)} modules; say which with dataset:class "
                        f"(one of {', '.join(refs[i].qualified for i in candidates)})")
    return candidates[0]


@dataclass(frozen=True)
class ComposerKind:
    """A composition that is a network of its own (not module folders composed as recorded), by its ``name`` (the
    :class:`~cnnmod.modules.kinds.Composing` that builds it): how it is saved (``save(composer, sources, out,
    overwrite, extra)`` -> its config) and loaded (``load(path, device)`` -> the composer and its source models).
    Its folder's config records ``granularity`` (the kind of module it was made of) and ``mode``: what
    :func:`composer_kind_of` recognises it by."""

    name: str
    granularity: str
    mode: str
    save: Callable[..., dict]
    load: Callable[..., tuple[Composer, list]]
    summary: Callable[..., dict] = lambda composer, sources: {}


COMPOSER_KINDS: dict[str, ComposerKind] = {}


def register_composer_kind(kind: ComposerKind) -> ComposerKind:
    """Make a kind of composition known to the store by its ``name``."""
    COMPOSER_KINDS[kind.name] = kind
    return kind


def composer_kind_of(config: dict) -> ComposerKind | None:
    """The composition kind of a folder's config (None for a composition of module folders, which records no
    ``granularity``: those load as their modules). Folders made before ``mode`` was recorded are merged ones."""
    if config.get("kind") != "composition" or "granularity" not in config:
        return None
    kinds()  # the built-in kinds register their compositions
    mode = config.get("mode", "merged")
    found = [k for k in COMPOSER_KINDS.values() if (k.granularity, k.mode) == (config["granularity"], mode)]
    if not found:
        raise UserError(f"a composition of {config['granularity']} modules in mode {mode!r}, which this cnnmod does "
                        "not know: upgrade cnnmod")
    return found[0]
