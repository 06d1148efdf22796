"""A torch ``Dataset`` (or ``DataLoader``) yielding (image, label) pairs, as an in-memory :class:`ImageSet`.

Images may be uint8 tensors (C, H, W), float tensors in [0, 1] (C, H, W) (what torchvision's ``ToTensor``
gives), PIL images, or uint8 numpy arrays (H, W) / (H, W, C); a ``DataLoader`` may batch them. Labels are ints
(or 0-d tensors). Every image must have the same shape: bring them to one size in the Dataset's own transform.
Normalisation is not the Dataset's business here: the model's :class:`~cnnmod.data.transforms.InputSpec` does it
(stated to :func:`cnnmod.wrap` as ``mean``/``std``), so a Dataset whose transform already normalises is refused (its
values leave [0, 1]).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .dataset import ImageSet


def _to_uint8(image, index: int) -> torch.Tensor:
    if hasattr(image, "mode") and hasattr(image, "size") and not isinstance(image, torch.Tensor):  # a PIL image
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"item {index} of the Dataset is a {image.dtype} array; give uint8 arrays or tensors")
        t = torch.from_numpy(np.ascontiguousarray(image))
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise UserError(f"item {index} of the Dataset yields a {type(image).__name__} as its image; give a tensor, "
                        "a PIL image or a uint8 array")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise UserError(f"item {index} of the Dataset is an image of shape {tuple(image.shape)}; give (C, H, W)")
    if image.dtype == torch.uint8:
        return image
    if image.is_floating_point():
        if float(image.min()) < -1e-6 or float(image.max()) > 1 + 1e-6:
            raise UserError(f"item {index} of the Dataset has values from {float(image.min()):.3g} to "
                            f"{float(image.max()):.3g}; give images in [0, 1]: drop Normalize from its transform "
                            "and give its constants to cnnmod.wrap(net, data=..., mean=..., std=...) instead")
        return (image * 255).round().clamp(0, 255).to(torch.uint8)
    raise UserError(f"item {index} of the Dataset is a {image.dtype} tensor; give uint8 or float images")


def _pairs(dataset):
    """(image, label) pairs, one at a time, from a Dataset or a batching DataLoader."""
    batched = isinstance(dataset, torch.utils.data.DataLoader) and dataset.batch_size is not None
    for i, item in enumerate(dataset):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"item {i} of the Dataset is a {type(item).__name__}, not an (image, label) pair")
        image, label = item
        if batched:
            for j in range(len(label)):
                yield image[j], label[j]
        else:
            yield image, label


def from_dataset(dataset, class_names: list[str] | None = None, name: str = "dataset", split: str = "train",
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> ImageSet:
    """Read every (image, label) of ``dataset`` into an :class:`ImageSet`. ``class_names`` defaults to the
    Dataset's own ``classes`` (as torchvision's have) or to the label numbers; ``mean``/``std`` (the set's
    statistics, what cnnmod trains its own models with) to the images' own. A network trained elsewhere states its
    own normalisation to :func:`cnnmod.wrap`."""
    images, labels, shape = [], [], None
    for i, (image, label) in enumerate(_pairs(dataset)):
        x = _to_uint8(image, i)
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise UserError(f"item {i} of the Dataset is {tuple(x.shape)} but the first was {shape}; bring every "
                            "image to one size in the Dataset's transform")
        try:
            labels.append(int(label))
        except (TypeError, ValueError):
            raise UserError(f"item {i} of the Dataset has the label {label!r}; give class indices (ints)")
        images.append(x)
    if not images:
        raise UserError("the Dataset is empty")
    y = torch.tensor(labels, dtype=torch.int64)
    if class_names is None:
        class_names = list(getattr(dataset, "classes", None) or [str(c) for c in range(int(y.max()) + 1)])
    x = torch.stack(images)
    if mean is None or std is None:
        f = x.float() / 255.0
        mean = mean or tuple(float(v) for v in f.mean((0, 2, 3)))
        std = std or tuple(max(float(v), 1e-3) for v in f.std((0, 2, 3)))
    return ImageSet(name, split, x, y, list(class_names), tuple(mean), tuple(std))


def as_image_set(data, class_names: list[str] | None = None) -> ImageSet:
    """``data`` as an :class:`ImageSet`: one already, or a torch Dataset/DataLoader read by :func:`from_dataset`."""
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return from_dataset(data, class_names)
    raise UserError(f"data must be an ImageSet or a torch Dataset of (image, label) pairs, got {type(data).__name__}")
