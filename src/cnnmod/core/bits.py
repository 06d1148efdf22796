"""Boolean node sets packed eight to a byte (numpy's ``packbits`` order, the first node in the highest bit): how
the observation pass keeps its per-class bits, how modules hold their masks in memory, and how module folders
store them. Packed sets stay on their device (numpy does the work on the CPU, where it is several times
faster; plain torch elsewhere)."""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """Bool (..., N) -> uint8 (..., ceil(N / 8)), along the last dimension."""
    if b.device.type == "cpu":
        arr = b.detach().contiguous().numpy()
        return torch.from_numpy(np.packbits(arr.view(np.uint8) if arr.dtype == np.bool_ else arr.astype(np.uint8),
                                            axis=-1))
    return pack_bits_torch(b)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., M) -> bool (..., n), n <= 8 M: the inverse of :func:`pack_bits`."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.detach().numpy(), axis=-1, count=n).view(bool))
    return unpack_bits_torch(packed, n)


def or_rows(rows) -> torch.Tensor:
    """The bitwise or of packed rows (a sequence of uint8 (M,) tensors, or the rows of a (K, M) one): (M,)."""
    out = rows[0].clone()
    for row in rows[1:]:
        out |= row
    return out


def pack_bits_torch(b: torch.Tensor) -> torch.Tensor:
    b = b.detach().to(torch.uint8)
    pad = (-b.shape[-1]) % 8
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return (b.reshape(*b.shape[:-1], -1, 8) << _SHIFTS.to(b.device)).sum(-1, dtype=torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed.detach().unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()
