"""Boolean node sets packed eight to a byte (numpy's ``packbits`` order, the first node in the highest bit): how
the observation pass keeps its per-class bits and how module folders store their masks."""

from __future__ import annotations

import numpy as np
import torch


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """Bool (..., N) -> uint8 (..., ceil(N / 8)), along the last dimension."""
    return torch.from_numpy(np.packbits(b.detach().cpu().numpy().astype(np.uint8), axis=-1))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., M) -> bool (..., n), n <= 8 M: the inverse of :func:`pack_bits`."""
    return torch.from_numpy(np.unpackbits(packed.detach().cpu().numpy(), axis=-1, count=n).astype(bool))
