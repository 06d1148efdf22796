"""A user's network is run as it was trained: the normalisation is stated, checked, and never guessed."""

import pytest
from conftest import ToTensorDigits, user_network

import cnnmod
from cnnmod.data.transforms import InputSpec


@pytest.fixture(scope="module")
def user_cnn():
    """A CNN trained in the user's own loop on [0, 1] inputs (no Normalize), its test accuracy in that loop."""
    made = user_network()
    return made["net"], made["train_ds"], made["test_ds"], made["own"]


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
