"""scikit-learn's bundled digits (8x8 greyscale, values 0-16).

There is no official split: a fixed 20% of each class, chosen with seed 0, is the test split.
Pixel values are scaled to 0-255.
"""

from __future__ import annotations

import numpy as np

TEST_FRACTION = 0.2


def decode() -> tuple[dict[str, np.ndarray], list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(len(idx) * TEST_FRACTION))]] = True
    arrays = {"x_train": x[~test], "y_train": y[~test], "x_test": x[test], "y_test": y[test]}
    return arrays, [str(i) for i in range(10)]
