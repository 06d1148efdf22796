"""The in-memory form every loader returns: uint8 images, int64 labels and class names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from .stream import batched, batches, is_streamed, select


@dataclass(frozen=True)
class ImageSet:
    """One split of an image classification data set.

    ``images`` is a uint8 tensor of shape (N, C, H, W), or a :class:`~cnnmod.data.stream.FileImages` that
    decodes them from disk batch by batch (read them with :meth:`batched`); ``labels`` int64 in [0, len(class_names)).
    ``source_classes`` maps each label back to the class index in the full data set (it differs from
    ``range(num_classes)`` after :meth:`subset`). ``mean`` and ``std`` are the per-channel statistics of
    the full data set's training split, in [0, 1] units, used for normalisation.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source_classes: list[int] = field(default_factory=list)
    root: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")
        if not self.source_classes:
            object.__setattr__(self, "source_classes", list(range(len(self.class_names))))
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise UserError(
                f"{self.name} ({self.split}): labels run from {int(self.labels.min())} to {int(self.labels.max())} "
                f"but there are {len(self.class_names)} classes; fix the labels or the class list"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, classes: list[int]) -> ImageSet:
        """Keep only ``classes`` (indices into this set's labels), relabelled 0..k-1 in the order given."""
        if not classes:
            raise UserError("the class list is empty; name at least one class, e.g. «classes» 0,3,7")
        if len(set(classes)) != len(classes):
            raise UserError(f"the class list {classes} names a class twice")
        for c in classes:
            if not 0 <= c < self.num_classes:
                raise UserError(
                    f"{self.name} has no class {c}: its classes are 0..{self.num_classes - 1} "
                    f"({', '.join(self.class_names[:5])}{', ...' if self.num_classes > 5 else ''})"
                )
        lookup = torch.full((self.num_classes,), -1, dtype=torch.int64)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        new_labels = lookup[self.labels]
        keep = new_labels >= 0
        return replace(
            self,
            images=select(self.images, keep),
            labels=new_labels[keep],
            class_names=[self.class_names[c] for c in classes],
            source_classes=[self.source_classes[c] for c in classes],
        )

    def take(self, index: torch.Tensor) -> ImageSet:
        """The images at ``index`` (a 1-D index tensor), with every class kept."""
        return replace(self, images=select(self.images, index), labels=self.labels[index])

    def digest(self) -> str:
        """sha256 of what the set holds (the streamed listing, or a strided sample of the pixels) and its labels:
        how torchrun's ranks check that they see the same data."""
        h = hashlib.sha256(f"{self.name}|{self.split}|{tuple(self.images.shape)}|".encode())
        h.update(self.labels.numpy().tobytes())
        if self.streamed:
            h.update(self.images.digest().encode())
        elif len(self):
            h.update(self.images[:: max(1, len(self) // 1024)].contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def streamed(self) -> bool:
        """Whether the images are read from disk batch by batch rather than held in memory."""
        return is_streamed(self.images)

    def batched(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images at each index tensor of ``chunks``, in order (decoded in workers when streamed)."""
        return batched(self.images, chunks)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every image, in order, ``batch_size`` at a time."""
        return batches(self.images, batch_size)

    def first_per_class(self, n: int, generator_seed: int | None = None) -> ImageSet:
        """At most ``n`` images of each class (after a seeded shuffle when a seed is given), class-ordered."""
        order = torch.arange(len(self))
        if generator_seed is not None:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(generator_seed))
        picked = []
        labels = self.labels[order]
        for c in range(self.num_classes):
            picked.append(order[labels == c][:n])
        return self.take(torch.cat(picked))


def parse_class_list(text: str | None, names: list[str] | None = None) -> list[int] | None:
    """``"0,3,7"`` -> ``[0, 3, 7]``; with the data's class ``names``, names too (``"T-shirt/top,Dress"`` ->
    ``[0, 3]``, case aside); ``None`` or ``""`` -> ``None``; anything else is a user error."""
    if text is None or text.strip() == "":
        return None
    lowered = [n.lower() for n in names] if names is not None else None
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part.lstrip("-").isdigit():
            out.append(int(part))
        elif lowered is not None and part.lower() in lowered:
            out.append(lowered.index(part.lower()))
        elif lowered is not None:
            raise UserError(f"no class named {part!r}; the classes are {', '.join(names[:20])}"
                            + (" ..." if len(names) > 20 else "") + " (or give their indices)")
        else:
            raise UserError(f"cannot read the class list {text!r}: give class indices separated by commas, e.g. "
                            "0,3,7")
    return out


def split_indices(n: int, val_split: float, subset: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a set of ``n`` images: those trained on and those validated on (a seeded subset of ``subset``
    images, if given, then a seeded validation split of it)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if subset is not None:
        order = order[:subset]
    n_val = int(len(order) * val_split)
    if val_split > 0 and n_val == 0:
        n_val = 1
    return order[n_val:], order[:n_val]


def split_train_val(data: ImageSet, val_split: float, subset: int | None,
                    seed: int) -> tuple[ImageSet, ImageSet | None]:
    """The images trained on and those validated on (None without a validation split): :func:`split_indices`."""
    trained, validated = split_indices(len(data), val_split, subset, seed)
    return data.take(trained), data.take(validated) if len(validated) else None
