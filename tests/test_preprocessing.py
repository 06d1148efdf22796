"""A user's network is run as it was trained: the normalisation is stated, checked, and never guessed."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import cnnmod
from cnnmod.data.transforms import InputSpec


class ToTensorDigits(torch.utils.data.Dataset):
    """scikit-learn's digits as a user's Dataset gives them: uint8 images through ``ToTensor()``, [0, 1] floats."""

    classes = [str(c) for c in range(10)]

    def __init__(self, x: torch.Tensor, y: torch.Tensor, normalize: tuple[float, float] | None = None) -> None:
        self.x, self.y, self.normalize = x, y, normalize

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        image = self.x[i]
        if self.normalize:
            image = (image - self.normalize[0]) / self.normalize[1]
        return image, int(self.y[i])


@pytest.fixture(scope="module")
def user_cnn():
    """A CNN trained in the user's own loop on [0, 1] inputs (no Normalize), its test accuracy in that loop."""
    digits = load_digits()
    u8 = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    x, y = u8.float() / 255, torch.from_numpy(digits.target).long()  # what ToTensor gives
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = order[:1400], order[1400:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(3):
        for b in torch.randperm(len(tr), generator=torch.Generator().manual_seed(1)).split(64):
            loss = nn.functional.cross_entropy(net(x[tr[b]]), y[tr[b]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        own = 100 * (net(x[te]).argmax(1) == y[te]).float().mean().item()
    return net, ToTensorDigits(x[tr], y[tr]), ToTensorDigits(x[te], y[te]), own


def test_a_network_wrapped_as_stated_scores_what_it_scores_in_its_own_loop(user_cnn):
    net, train_ds, test_ds, own = user_cnn
    train, test = cnnmod.from_dataset(train_ds), cnnmod.from_dataset(test_ds, split="test")
    model = cnnmod.wrap(net, data=train, mean=0, std=1)
    clf = cnnmod.compose(cnnmod.decompose(model, train))
    assert round(cnnmod.evaluate(clf, test, model=model)["model_top1"], 2) == round(own, 2)


def test_an_unstated_normalisation_is_refused_naming_the_one_that_fits(user_cnn):
    net, train_ds, _, _ = user_cnn
    train = cnnmod.from_dataset(train_ds)
    with pytest.raises(cnnmod.UserError, match=r"state the normalisation.*mean=0, std=1\) fits best"):
        cnnmod.wrap(net, data=train)
    with pytest.raises(cnnmod.UserError, match=r"state the normalisation"):
        cnnmod.decompose(net, train)  # a plain nn.Module is not taken to have seen the data's statistics


def test_a_stated_normalisation_clearly_worse_is_refused(user_cnn):
    """0.5/0.5 loses points on a network trained on [0, 1] inputs: refused, naming [0, 1] inputs as the fix."""
    net, train_ds, _, _ = user_cnn
    train = cnnmod.from_dataset(train_ds)
    with pytest.raises(cnnmod.UserError, match=r"not trained with the normalisation stated.*mean=0, std=1\) fits"):
        cnnmod.wrap(net, data=train, mean=0.5, std=0.5)
    with pytest.raises(cnnmod.UserError, match="not trained with the normalisation stated"):
        cnnmod.wrap(net, data=train, spec=InputSpec(1, 8, 8, (0.5,), (0.5,)))


def test_a_normalizing_dataset_is_refused_naming_mean_and_std(user_cnn):
    net, train_ds, _, _ = user_cnn
    with pytest.raises(cnnmod.UserError, match=r"drop Normalize.*mean=\.\.\., std=\.\.\."):
        cnnmod.from_dataset(ToTensorDigits(train_ds.x, train_ds.y, normalize=(0.5, 0.5)))


def test_half_a_normalisation_is_one_line(user_cnn):
    net, train_ds, _, _ = user_cnn
    with pytest.raises(cnnmod.UserError, match="give both mean and std"):
        cnnmod.wrap(net, data=cnnmod.from_dataset(train_ds), mean=0)
