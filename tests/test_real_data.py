"""The real Fashion-MNIST (Debian's dataset-fashion-mnist, which `make test` installs)."""

from __future__ import annotations

import pytest
import torch

from cnnmod.data import idx, load
from cnnmod.data.registry import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST is not installed (make test installs it)")


def test_fashion_mnist_is_complete_and_cached(monkeypatch) -> None:
    train = load("fashion-mnist", "train")
    test = load("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[9] == "Ankle boot"
    # the published statistics of the training images
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-3) and train.std[0] == pytest.approx(0.3530, abs=1e-3)
    # a second load comes from the cache: it must not decode the IDX files again
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(idx, "decode", no_decode)
    again = load("fashion-mnist", "train")
    assert torch.equal(again.labels, train.labels) and torch.equal(again.images[-1], train.images[-1])
