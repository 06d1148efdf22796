"""Image transforms as batched tensor operations (no PIL in the training loop).

Images stay uint8 (N, C, H, W) until :func:`to_input`, which converts, resizes, changes the channel count
and normalises in one place, so training, evaluation and decomposition see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FITS = ("resize", "center-crop")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: channels, height, width, per-channel normalisation (in [0, 1] units), and how
    images of another size are brought to it: ``fit="resize"`` (bilinear, antialiased) or ``"center-crop"``
    (the shorter side resized to ``size / crop``, then the centre cut out: how ImageNet models are evaluated,
    256 -> 224 at ``crop=0.875``)."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fit: str = "resize"
    crop: float = 0.875

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            raise ValueError(f"mean and std need 1 or {self.channels} values for {self.channels} channels, got "
                             f"{len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std) or not 0 < self.crop <= 1:
            raise ValueError("std must be positive and crop in (0, 1]")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def to_dict(self) -> dict:
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "mean": list(self.mean), "std": list(self.std), "fit": self.fit, "crop": self.crop}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                   str(d.get("fit", "resize")), float(d.get("crop", 0.875)))


def fit_size(x: torch.Tensor, height: int, width: int, fit: str = "resize", crop: float = 0.875) -> torch.Tensor:
    """Float images (N, C, h, w) brought to (height, width) as ``fit`` says (see :class:`InputSpec`)."""
    if x.shape[-2:] == (height, width):
        return x
    if fit == "center-crop":
        h, w = x.shape[-2:]
        short = round(min(height, width) / crop)
        scale = short / min(h, w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        return x[..., top:top + height, left:left + width]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """1 -> 3 channels by repetition, 3 -> 1 by ITU-R 601 luma; float or uint8 in, float out."""
    x = x.float()
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def to_input(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float normalised model input of ``spec``'s shape, on the images' device."""
    x = fit_size(convert_channels(images, spec.channels) / 255.0, spec.height, spec.width, spec.fit, spec.crop)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def resize_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 images of ``shape`` (channels converted, bilinear antialiased resize)."""
    c, h, w = shape
    if tuple(images.shape[1:]) == (c, h, w):
        return images
    out = []
    for start in range(0, images.shape[0], 4096):
        x = convert_channels(images[start:start + 4096], c)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, c, h, w, dtype=torch.uint8)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: pad-and-random-crop and optional horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_hflip(x, generator) if self.hflip else x
