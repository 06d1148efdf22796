"""Layers that subclass a layer cnnmod knows (timm's norm + activation layers, its ``Linear``), read as what they
compute: a network written with them gives the modules that the same network written with plain layers gives; a
subclass that computes something else is refused in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_data
from families import ShuffleUnit, shufflenet_v2
from fixtures.make_torchvision_fixture import fill
from torch import nn

import cnnmod
from cnnmod.data.transforms import InputSpec
from cnnmod.errors import UserError
from cnnmod.models.classifier import Classifier
from cnnmod.runtime import Passes


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm writes it: a BatchNorm whose forward normalises functionally, then applies ``drop`` and ``act``."""

    def __init__(self, channels: int, act: type = nn.ReLU) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor,
                         self.eps)
        return self.act(self.drop(x))


class Linear(nn.Linear):
    """As timm writes it: ``nn.Linear`` with a forward of its own."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("key", ["bn_act_relu", "bn_act_silu", "linear"])
def test_the_copies_of_timms_layers_compute_what_timms_own_do(key):
    """Against timm 1.0.31 itself (tests/fixtures/make_timm_layers_fixture.py, run once): the same keys and, under
    the same deterministic weights, the same outputs."""
    recorded = json.loads((Path(__file__).parent / "fixtures" / "timm_layers_1.0.31.json").read_text())["layers"][key]
    layer = {"bn_act_relu": lambda: BatchNormAct2d(6), "bn_act_silu": lambda: BatchNormAct2d(6, nn.SiLU),
             "linear": lambda: Linear(6, 3)}[key]()
    state = layer.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == recorded["keys"]
    layer.load_state_dict(fill(state))
    x = torch.sin(torch.arange(2 * 6 * 4 * 4, dtype=torch.float64) * 0.11).reshape(2, 6, 4, 4).float()
    with torch.no_grad():
        out = layer.eval()(x[:, :, 0, 0] if key == "linear" else x)
    torch.testing.assert_close(out.flatten(), torch.tensor(recorded["output"]), rtol=0, atol=2e-6)


class ScaledAfter(BatchNormAct2d):
    """Not what it subclasses: doubles the activation's output."""

    def forward(self, x):
        return 2 * super().forward(x)


class Net(nn.Module):
    """conv-BN-act twice with a residual addition, pooling, a linear head; ``norm`` and ``linear`` choose timm's
    layers or torch's (then the activation is a layer of its own, with no parameters: the keys are the same)."""

    def __init__(self, norm=BatchNormAct2d, linear=Linear, act: type = nn.ReLU) -> None:
        super().__init__()
        plain = norm is nn.BatchNorm2d
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), norm(6) if plain else norm(6, act)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), norm(6) if plain else norm(6, act)
        self.act1, self.act2 = (act(), act()) if plain else (nn.Identity(), nn.Identity())
        self.fc = linear(6, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = x + self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def pair(act: type = nn.ReLU) -> tuple[Classifier, Classifier]:
    """The same weights as timm's layers and as torch's."""
    torch.manual_seed(0)
    ours = Net(act=act).eval()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    plain = Net(nn.BatchNorm2d, nn.Linear, act).eval()
    plain.load_state_dict(ours.state_dict())
    spec = InputSpec(1, 12, 12, (0.5,), (0.25,))
    return tuple(Classifier(n, spec, [f"r{c}" for c in range(4)], "x", {}, "rand") for n in (ours, plain))


def outputs(composer, data) -> torch.Tensor:
    with torch.no_grad():
        return composer(data.images)


def test_norm_act_layers_give_the_modules_plain_layers_give():
    data = random_data()
    timm_style, plain = pair()
    quiet = Passes(progress=False)
    for variant in ("mc", "mc-bln", "mc-bi"):
        got = [outputs(cnnmod.compose(cnnmod.decompose(clf, data, variant, passes=quiet, calibration_samples=0)),
                       data) for clf in (timm_style, plain)]
        torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-6)
    slim = [cnnmod.decompose(clf, data, granularity="channel", classes=[0, 1], samples=16, step_samples=None,
                             held_out=4, passes=quiet, calibration_samples=0) for clf in (timm_style, plain)]
    for a, b in zip(*slim, strict=True):
        assert a.removed == b.removed  # the same channels cut
        with torch.no_grad():
            x = a.prepare(data.images)
            torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_a_norm_act_layer_with_another_activation_is_slim_only():
    data = random_data()
    clf, _ = pair(nn.SiLU)
    with pytest.raises(UserError, match=r"'bn1' \(BatchNormAct2d with SiLU\).*use slim modules"):
        cnnmod.decompose(clf, data, passes=Passes(progress=False))
    made = cnnmod.decompose(clf, data, granularity="channel", classes=[0], samples=16, held_out=4,
                            passes=Passes(progress=False), calibration_samples=0)
    assert made[0].kept_fraction() < 1


def test_a_subclass_that_computes_something_else_is_refused_naming_it():
    data = random_data()
    clf, _ = pair()
    clf.net.bn2.__class__ = ScaledAfter
    with pytest.raises(UserError, match=r"layer 'bn2' \(ScaledAfter\) computes something besides a BatchNorm "
                                        r"followed by an elementwise activation"):
        cnnmod.decompose(clf, data, passes=Passes(progress=False))


class Resized(nn.Module):
    """Control flow on a traced value (as MobileViT's blocks resize to a patch multiple): torch.fx cannot trace
    into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        if x.shape[-1] % 4:
            x = F.interpolate(x, size=(8, 8))
        return self.conv(x)


class WithResized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.block, self.conv2 = Resized(), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_a_module_torch_fx_cannot_trace_into_is_kept_whole_and_the_rest_is_cut():
    torch.manual_seed(0)
    spec = InputSpec(1, 12, 12, (0.5,), (0.25,))
    clf = Classifier(WithResized().eval(), spec, [f"r{c}" for c in range(4)], "x", {}, "rand")
    data = random_data()
    node = cnnmod.decompose(clf, data, "mc", passes=Passes(progress=False), calibration_samples=0)
    assert [p.layer for p in node[0].points] == ["conv1", "conv2"]  # the block's convolution is not observed
    made = cnnmod.decompose(clf, data, granularity="channel", classes=[0, 1], samples=16, held_out=4,
                            passes=Passes(progress=False), calibration_samples=0)
    for m in made:
        assert list(m.metrics["whole"]) == ["block"] and "torch.fx cannot trace into it" in m.metrics["whole"]["block"]
        assert set(m.removed) <= {"conv1", "conv2"} and m.kept_fraction() < 1
        x = m.prepare(data.images)
        with torch.no_grad():
            assert m(x).shape == (len(x), 2)


def test_the_default_size_out_of_reach_cuts_as_far_as_it_goes_and_says_so(capsys):
    """A block kept whole holds most of the parameters: a size asked for below what is left is refused in one
    line; the default size (not asked for) makes the modules as small as they go, and the run says so."""
    torch.manual_seed(0)
    net = WithResized().eval()
    # most of the network, inside the block kept whole
    net.block.conv = nn.Sequential(nn.Conv2d(6, 24, 1), nn.Conv2d(24, 24, 3, padding=1), nn.Conv2d(24, 6, 1))
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "x", {}, "rand")
    data = random_data()
    given = dict(samples=16, held_out=4, passes=Passes(progress=False), calibration_samples=0)
    with pytest.raises(UserError, match=r"size 0.5 is out of reach for x: every channel group keeps at least one"):
        cnnmod.decompose(clf, data, granularity="channel", size=0.5, **given)
    made = cnnmod.decompose(clf, data, granularity="channel", **given)
    floor = min(m.kept_fraction() for m in made)
    assert 0.5 < floor < 1 and all(m.settings["default_size"] for m in made)
    err = capsys.readouterr().err
    assert "the default size 0.5 is out of reach for x" in err and "1 layer kept whole" in err


class TorchvisionShuffle(ShuffleUnit):
    """ShuffleNetV2's unit with the shuffle as torchvision writes it (``view(b, -1, h, w)``)."""

    def shuffle(self, out):
        n, c, h, w = out.size()
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


@cnnmod.register_arch("shufflenet_torchvision_style")
def shufflenet_torchvision_style(in_channels: int = 1, num_classes: int = 4) -> nn.Module:
    net = shufflenet_v2(in_channels, num_classes, 8)
    for m in net:
        if isinstance(m, ShuffleUnit):
            m.__class__ = TorchvisionShuffle
    return net


def test_channels_of_a_network_torch_pruning_cannot_trace_are_sliced_in_chains(tmp_path, monkeypatch):
    """Where torch-pruning cannot trace the network (torchvision's ShuffleNetV2 at small inputs: it divides by
    zero; here it is made to fail), each branch's inner channels (1x1 convolution, BatchNorm, ReLU, depthwise
    convolution, BatchNorm, 1x1 convolution) are cut by cnnmod itself; the modules compute what their gated
    networks do (checked as they are made) and reload to the same outputs."""
    import torch_pruning

    def fails(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", fails)
    torch.manual_seed(0)
    net = shufflenet_torchvision_style().eval()
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)],
                     "shufflenet_torchvision_style", {}, "rand")
    data = random_data()
    made = cnnmod.decompose(clf, data, granularity="channel", classes=[0, 1], samples=16, held_out=4,
                            passes=Passes(progress=False), calibration_samples=0)
    chains = {f"{i}.right.0.0" for i in (1, 2, 3, 4)}  # each unit's first 1x1 convolution of its right branch
    for m in made:
        assert set(m.metrics["chains"]) == chains and set(m.removed) <= chains and m.kept_fraction() < 1
    cnnmod.save_decomposition(made, tmp_path / "d")
    loaded = cnnmod.load_modules(tmp_path / "d")
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(made, loaded, strict=True):
            assert torch.equal(a(a.prepare(images)), b(b.prepare(images)))


class SharedConv(nn.Module):
    """One convolution called by two blocks (as CoaT shares its convolutional position encodings)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.shared, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), \
            nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = x + self.shared(x)
        x = torch.relu(self.conv2(x))
        x = x + self.shared(x)
        return self.fc(x.mean((2, 3)))


def test_a_layer_called_twice_is_kept_by_slim_modules_and_refused_by_node_level_ones():
    torch.manual_seed(0)
    clf = Classifier(SharedConv().eval(), InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "x",
                     {}, "rand")
    data = random_data()
    with pytest.raises(UserError, match=r"layer 'shared' is called more than once .* use slim modules"):
        cnnmod.decompose(clf, data, passes=Passes(progress=False))
    made = cnnmod.decompose(clf, data, granularity="channel", classes=[0], samples=16, held_out=4,
                            passes=Passes(progress=False), calibration_samples=0)
    net = made[0].net  # the residual width, computed by the shared layer too, cut in all its layers at once
    assert made[0].kept_fraction() < 1 and net.shared.in_channels == net.shared.out_channels == net.conv1.out_channels


class SamePadding(nn.Module):
    """Convolutions padded with ``padding="same"`` (ConvMixer's): an odd kernel pads evenly, an even one by one
    more on the right and bottom."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, k, padding="same"), nn.Conv2d(6, 6, k, padding="same")
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("k", [3, 4])
def test_same_padding_is_read_as_pytorch_pads(k):
    """Slim modules refit their kept weights by least squares on the convolutions' input patches (the default
    recipe), padded as PyTorch pads them (a string padding was a traceback there); MC-BI follows an even padding
    and refuses an uneven one in one line."""
    torch.manual_seed(0)
    clf = Classifier(SamePadding(k).eval(), InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)],
                     "x", {}, "rand")
    data = random_data()
    made = cnnmod.decompose(clf, data, granularity="channel", classes=[0], samples=16, held_out=4,
                            passes=Passes(progress=False), calibration_samples=0)
    assert made[0].settings["reconstruct"] and made[0].kept_fraction() < 1
    quiet = dict(passes=Passes(progress=False), calibration_samples=0)
    if k % 2:
        assert len(cnnmod.decompose(clf, data, "mc-bi", **quiet)) == 4
    else:
        with pytest.raises(UserError, match=r"MC-BI cannot follow the model through layer 'conv2' .* pads its input "
                                            r"by more on one side"):
            cnnmod.decompose(clf, data, "mc-bi", **quiet)


class Versioned(nn.Module):
    """A network whose weights carry a format version (torchvision's MNASNet refuses weights of none)."""

    _version = 2

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(in_channels, 6, 3), nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


cnnmod.register_arch("versioned_net")(Versioned)


def saved_and_loaded(net: nn.Module, folder) -> tuple[list, list]:
    """Node-level modules of a registered network, and the same saved to ``folder`` and loaded again."""
    data = random_data()
    model = cnnmod.wrap(net.eval(), data=data, mean=0.5, std=0.25)
    made = cnnmod.decompose(model, data, passes=Passes(progress=False), calibration_samples=0)
    cnnmod.save_decomposition(made, folder)
    return made, cnnmod.load_modules(folder)


def test_weights_load_with_the_versions_of_the_code_that_builds_the_network(tmp_path):
    assert saved_and_loaded(Versioned(), tmp_path / "d")[1][0].source.net.conv.out_channels == 6



class Tied(nn.Module):
    """Two layers sharing one weight (CoaT's parallel blocks share their MLPs)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(in_channels, 6, 3), nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.relu(self.a(x)) + torch.relu(self.b(x)))


cnnmod.register_arch("tied_net")(Tied)


def test_tied_weights_are_saved_and_tied_again_on_load(tmp_path):
    made, loaded = saved_and_loaded(Tied(), tmp_path / "d")
    assert loaded[0].source.net.a.weight is loaded[0].source.net.b.weight
    x = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(cnnmod.compose(loaded)(x), cnnmod.compose(made)(x))


def test_a_linear_layer_with_a_batchnorm_over_its_outputs_is_folded_into_one():
    """LeViT's ``LinearNorm`` (BatchNorm1d over the tokens folded into the batch) is one linear layer in eval mode:
    W s and (b - mean) s + beta, s = gamma / sqrt(var + eps), worked out here by hand; the network's MLP hidden
    units are then cut as a plain MLP's. A module that normalises before its linear layer is left as it is."""
    from families import LevitLike, LinearNorm

    from cnnmod.core.folding import fold_linear_norms
    from cnnmod.slim.channels import frozen_copy

    torch.manual_seed(0)
    ln = LinearNorm(6, 4).eval()
    ln.bn.running_mean.uniform_(-1, 1)
    ln.bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(ln.bn.weight, 0.5, 1.5)
    nn.init.uniform_(ln.bn.bias, -1, 1)
    holder = nn.Sequential(ln)
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        expected = ln(x)
        fold_linear_norms(holder, None)
        assert holder[0] is ln  # without an input to check on, nothing is folded
        folded = fold_linear_norms(nn.Sequential(ln), (5, 6))[0]
        s = ln.bn.weight / torch.sqrt(ln.bn.running_var + ln.bn.eps)
        assert type(folded) is nn.Linear
        assert torch.allclose(folded.weight, ln.linear.weight * s[:, None])
        assert torch.allclose(folded.bias, (0 - ln.bn.running_mean) * s + ln.bn.bias)
        assert torch.allclose(folded(x), expected, atol=1e-6)

    class NormFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.linear = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(self.bn(x))

    first = nn.Sequential(NormFirst().eval())
    first[0].bn.running_mean.fill_(0.5)
    assert isinstance(fold_linear_norms(first, (4,))[0], NormFirst)

    graph, net, groups = frozen_copy(LevitLike(1, 4, 8).eval(), (1, 16, 16))
    assert {u.root for u in groups.units.values() if u.kind == "hidden"} == {"mlps.0.0", "mlps.1.0"}


def test_a_network_whose_layers_cache_tensors_computed_from_their_parameters_is_cut():
    """timm's TinyViT and LeViT keep their attention biases, gathered from a parameter, in a dict once run in eval
    mode with gradients on: ``copy.deepcopy`` refuses such a tensor, so slim modules of it failed with a traceback;
    they are made, and compute what the gated network computes."""
    from cnnmod.core.layers import copied

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 4)
            self.scale = nn.Parameter(torch.tensor(1.5))
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x):
            if not self.training:
                self.cache.setdefault("s", self.scale * 2)  # computed from a parameter: not a leaf
            s = self.cache["s"] if not self.training else self.scale * 2
            return self.fc2(F.relu(self.fc1(x.flatten(1))) * s)

    net = Cached().eval()
    net(torch.randn(2, 1, 4, 4))
    assert net.cache["s"].grad_fn is not None
    with pytest.raises(RuntimeError, match="deepcopy"):
        import copy
        copy.deepcopy(net)
    twin = copied(net)
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(twin(x), net(x)) and twin.cache["s"].grad_fn is None
    clf = Classifier(net, InputSpec(1, 4, 4, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "cached", {}, "rand")
    modules = cnnmod.decompose(clf, random_data((1, 4, 4), 4, 8), granularity="channel", classes=[0], size=0.7,
                               samples=8, calibration_samples=0)
    assert modules[0].params() < clf.params()
