"""Decomposition on hand-built networks whose modules are worked out by hand, and brute-force cross-checks."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import as_trained, random_data
from torch import nn

from cnnmod import UserError
from cnnmod.composition.base import vote
from cnnmod.composition.voting import compose
from cnnmod.core.graph import ModelGraph
from cnnmod.core.masking import binary_head
from cnnmod.core.observe import Sampling, class_order, hooks, observe
from cnnmod.core.ops import transpose_cover
from cnnmod.data.dataset import ImageSet
from cnnmod.data.transforms import InputSpec, to_input
from cnnmod.models import build
from cnnmod.models.classifier import Classifier
from cnnmod.node.method import Ablation, DecomposeSettings, keep_masks
from cnnmod.node.method import decompose as decompose_model
from cnnmod.node.module import Module
from cnnmod.node.walks import mark_back, needed
from cnnmod.runtime import Passes


def decompose(net, data, *args, **kwargs):
    """The library's decomposition of ``net`` as trained on ``data``'s normalisation (stated, as a user does)."""
    return decompose_model(as_trained(net, data), data, *args, **kwargs)


# Inputs are given as raw pixel values; this spec makes the model's input x = pixel - 128.
PIXEL_SPEC = dict(mean=(128 / 255,), std=(1 / 255,))


def image_set(pixels: list[list[int]], labels: list[int], shape: tuple[int, int, int], classes: int) -> ImageSet:
    images = torch.tensor(pixels, dtype=torch.uint8).reshape(len(pixels), *shape)
    return ImageSet("hand", "train", images, torch.tensor(labels), [f"k{c}" for c in range(classes)],
                    PIXEL_SPEC["mean"], PIXEL_SPEC["std"])


def classifier(net: nn.Module, shape: tuple[int, int, int], classes: int) -> Classifier:
    return Classifier(net.eval(), InputSpec(*shape, *PIXEL_SPEC.values()), [f"k{c}" for c in range(classes)])


# ---------------------------------------------------------------------------------------------- a dense network
class HandMLP(nn.Module):
    """x (2 values) -> hidden h = W1 x + b1 (4 ReLU units) -> 3 classes.

    h0 = x0, h1 = x1, h2 = -x0 - x1, h3 = x0 + x1 - 6.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(2, 4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, -1], [1, 1]]))
            self.hidden.bias.copy_(torch.tensor([0.0, 0, 0, -6]))
            self.fc.weight.copy_(torch.tensor([[2.0, -1, -1, 1], [-1, 2, -1, 0], [-1, -1, 2, 0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))

    def forward(self, x):
        return self.fc(self.relu(self.hidden(self.flat(x))))


A, B, C, D = [133, 128], [133, 130], [128, 133], [123, 123]   # x = (5,0) (5,2) (0,5) (-5,-5)
# active hidden units: A {h0}, B {h0, h1, h3}, C {h1}, D {h2}


def hand_mlp_data() -> ImageSet:
    return image_set([A, A, A, B, C, C, C, C, D, D, D, D], [0] * 4 + [1] * 4 + [2] * 4, (1, 1, 2), 3)


def position_of_b(seed: int) -> int:
    """Where the one B input of class 0 stands in class 0's observation order (the documented seeded shuffle)."""
    data = hand_mlp_data()
    order = class_order(data.labels, 3, seed)[0].tolist()
    return order.index(3)


def kept(module: Module) -> set[int]:
    return {i for i, v in enumerate(module.masks["hidden"].tolist()) if v}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hand_mlp_ci_ti(seed):
    data = hand_mlp_data()
    net = HandMLP()
    modules = decompose(net, data, "mc", settings=DecomposeSettings(seed=seed))
    b_early = position_of_b(seed) < 2  # TI takes the first k = floor(4 / 2) = 2 inputs of each other class
    assert kept(modules[0]) == {0, 1, 2, 3}                            # CI {0,1,3} (B), TI: C {1}, D {2}
    assert kept(modules[1]) == {0, 1, 2} | ({3} if b_early else set())  # CI {1}; TI: class 0 {0}(+{1,3}), D {2}
    assert kept(modules[2]) == {0, 1, 2} | ({3} if b_early else set())
    # with tau = 0.5, CI keeps only units active for at least half of the class's inputs: h3 (1 of 4) goes
    modules = decompose(net, data, "mc", settings=DecomposeSettings(seed=seed, ablation=Ablation(tau=0.5)))
    assert kept(modules[0]) == {0, 1, 2}
    # with 3 inputs per class, class 0 is observed on its first 3 only, and k = floor(3 / 2) = 1
    modules = decompose(net, data, "mc", settings=DecomposeSettings(seed=seed, ci_samples=3))
    pos = position_of_b(seed)
    assert kept(modules[0]) == {0, 1, 2} | ({3} if pos < 3 else set())
    assert kept(modules[1]) == {0, 1, 2} | ({3} if pos < 1 else set())


def test_hand_mlp_heads_and_bln_conditions():
    data, net = hand_mlp_data(), HandMLP()
    # head rows: module 0: w_c = [2,-1,-1,1], w_uc = [-1,.5,.5,0]; module 1: [-1,2,-1,0] / [.5,-1,.5,.5]; ...
    mc = decompose(net, data, "mc")
    assert torch.allclose(mc[1].head_weight, torch.tensor([[-1.0, 2, -1, 0], [0.5, -1, 0.5, 0.5]]))
    assert torch.allclose(mc[1].head_bias, torch.tensor([0.5, -0.25]))
    # pseudo-code condition (w_uc <= -0.5 and w_c >= 0.5) marks feature c of module c: switched off at the layer
    bln = decompose(net, data, "mc-bln")
    for c in range(3):
        assert kept(bln[c]) == kept(mc[c]) - {c}
    # prose condition (|w_c| < 0.5 and w_uc >= 0.5): module 0 marks nothing, modules 1 and 2 mark feature 3
    prose = decompose(net, data, "mc-bln", settings=DecomposeSettings(ablation=Ablation(condition="prose")))
    assert kept(prose[0]) == kept(mc[0])
    assert kept(prose[1]) == kept(mc[1]) - {3}
    assert kept(prose[2]) == kept(mc[2]) - {3}


def test_relative_delta_is_in_units_of_the_heads_weights():
    """Module 0's head rows are [2,-1,-1,1] / [-1,.5,.5,0] (root mean square 1.0308): with --relative-delta the
    pseudo-code threshold 0.5 becomes 0.515, so feature 0 stays marked (2 >= .515, -1 <= -.515); at --delta 1
    (1.031) nothing is (w_uc = -1 > -1.031). The head scaled by 10 marks the same with the relative delta, where
    the absolute one marks more."""
    data, net = hand_mlp_data(), HandMLP()
    mc = decompose(net, data, "mc")

    def off(delta: float, relative: bool, scale: float = 1.0) -> set:
        with torch.no_grad():
            scaled = HandMLP()
            scaled.fc.weight.mul_(scale)
            scaled.fc.bias.mul_(scale)
        s = DecomposeSettings(delta=delta, ablation=Ablation(relative_delta=relative))
        m = decompose(scaled, data, "mc-bln", settings=s, classes=[0])[0]
        return kept(mc[0]) - kept(m)

    assert off(0.5, False) == off(0.5, True) == {0}
    assert off(1.0, False) == {0} and off(1.0, True) == set()
    assert off(1.0, True, scale=10.0) == set() and off(1.0, False, scale=10.0) == {0}
    assert off(0.5, True, scale=10.0) == {0}


def test_hand_mlp_scores_match_formula():
    data, net = hand_mlp_data(), HandMLP()
    bln = decompose(net, data, "mc-bln", settings=DecomposeSettings(seed=0))
    w2, b2 = net.fc.weight.detach(), net.fc.bias.detach()
    x = torch.tensor([[5.0, 0], [5, 2], [0, 5], [-5, -5], [3, 4]])
    pixels = (x + 128).to(torch.uint8).reshape(-1, 1, 1, 2)
    for c, m in enumerate(bln):
        h = torch.relu(x @ net.hidden.weight.detach().T + net.hidden.bias.detach())
        h = h * m.masks["hidden"].float()
        others = [o for o in range(3) if o != c]
        z_c = h @ w2[c] + b2[c]
        z_uc = h @ w2[others].mean(0) + b2[others].mean()
        expected = torch.sigmoid(z_c - z_uc)
        assert torch.allclose(m.score(m.prepare(pixels)), expected, atol=1e-6)


class TwoHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.fc = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 3)
        with torch.no_grad():
            self.l2.weight.copy_(torch.tensor([[-1.0, 1.0], [0.3, 1.0]]))
            self.fc.weight.copy_(torch.tensor([[-2.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))

    def forward(self, x):
        return self.fc(F.relu(self.l2(F.relu(self.l1(torch.flatten(x, 1))))))


def test_bln_walks_back_through_hidden_dense_layers():
    g = ModelGraph(TwoHidden(), (1, 1, 2))
    # module of class 1: w_c = fc[1] = [1, 0], w_uc = mean(fc[0], fc[2]) = [-0.5, 0]: feature 0 marked;
    # below it, l1 unit 0 feeds l2 unit 0 with weight -1 <= -0.5: marked; unit 1 (weight 1) is not
    hw, _ = binary_head(g.module("fc").weight.detach(), g.module("fc").bias.detach(), 1)
    from cnnmod.node.method import marked_features

    marked = marked_features(hw, 0.5)
    assert marked.tolist() == [True, False]
    off = mark_back(g, marked, 0.5)
    assert off["l2"].tolist() == [True, False]
    assert off["l1"].tolist() == [True, False]


# ------------------------------------------------------------------------- a network with residual addition
class HandRes(nn.Module):
    """conv1 (1->2, 1x1: [x, -x]) -> ReLU -> conv2 (1x1 identity) + shortcut -> ReLU -> maxpool 2 -> avgpool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.conv2.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        r = F.relu(self.conv1(x))
        return self.fc(torch.flatten(self.gap(self.pool(F.relu(self.conv2(r) + r))), 1))


def test_hand_residual_network_modules():
    # 4x4 images: class 0 bright in the top-left quarter only, class 1 dark in the bottom-right quarter only,
    # class 2 uniform grey (x = 0 everywhere: no node is ever active)
    top_left = torch.full((4, 4), 128)
    top_left[:2, :2] = 140
    bottom_right = torch.full((4, 4), 128)
    bottom_right[2:, 2:] = 100
    grey = torch.full((4, 4), 128)
    pixels = [top_left.tolist()] * 2 + [bottom_right.tolist()] * 2 + [grey.tolist()] * 2
    data = image_set(pixels, [0, 0, 1, 1, 2, 2], (1, 4, 4), 3)
    net = HandRes()
    tl = torch.zeros(4, 4, dtype=torch.bool)
    tl[:2, :2] = True
    br = torch.zeros(4, 4, dtype=torch.bool)
    br[2:, 2:] = True
    mc = decompose(net, data, "mc")
    # class 0 activates channel 0 on the top-left; class 1 channel 1 on the bottom-right; class 2 nothing.
    # k = max(1, floor(2 / 2)) = 1 input of each other class; both of a class are identical anyway.
    expect = {0: (tl, br), 1: (tl, br), 2: (tl, br)}  # (channel 0 kept, channel 1 kept), at conv1 and conv2 alike
    for c, m in enumerate(mc):
        for point in ("conv1", "conv2"):
            assert torch.equal(m.masks[point][0], expect[c][0]), (c, point)
            assert torch.equal(m.masks[point][1], expect[c][1]), (c, point)
    # MC-BLN (pseudo-code): module 0: w_c = [1,-1], w_uc = mean([-1,1],[0,0]) = [-.5,.5] -> feature 0 marked;
    # through global average pooling, max pooling and the residual addition, channel 0 is switched off in both
    # conv2 (one input of the addition) and conv1 (the other input, through its ReLU), at every position.
    bln = decompose(net, data, "mc-bln")
    for point in ("conv1", "conv2"):
        assert not bln[0].masks[point][0].any()
        assert torch.equal(bln[0].masks[point][1], br)
        assert not bln[1].masks[point][1].any()       # module 1 marks feature 1
        assert torch.equal(bln[1].masks[point][0], tl)
        assert torch.equal(bln[2].masks[point], mc[2].masks[point])  # module 2: w_c = 0, nothing marked
    # composed predictions, worked out: feature f = mean over the 2x2 pooled map of relu(2 * relu(+-x)) per channel.
    comp = compose(mc)
    scores = comp(data.images)
    # grey images give every module p = 0.5: nobody votes, and the tie goes to the lowest class
    assert comp.predict(data.images).tolist() == [0, 0, 1, 1, 0, 0]
    f0 = torch.tensor([2 * 12 / 4, 0.0])   # top-left image: channel 0 is 2*12 in one pooled cell of four
    z = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]]) @ f0
    p = torch.stack([torch.sigmoid(z[c] - (z.sum() - z[c]) / 2) for c in range(3)])
    assert torch.allclose(scores[0], p, atol=1e-6)


class Chain(nn.Module):
    """conv (3x3, pad 1) -> ReLU -> conv (3x3, no padding: 4x4 -> 2x2) -> ReLU -> avgpool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(F.relu(self.conv2(F.relu(self.conv1(x))))), 1))


def test_mc_bi_receptive_field_by_hand():
    g = ModelGraph(Chain(), (1, 4, 4))
    masks = {"conv1": torch.ones(1, 4, 4, dtype=torch.bool), "conv2": torch.ones(1, 2, 2, dtype=torch.bool)}
    masks["conv2"][0, 0, 0] = False
    need = needed(g, masks)
    # conv1 node (i, j) feeds conv2 outputs (a, b) with a in [i-2, i], b in [j-2, j]; only (0, 0) feeds (0, 0) alone
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = False
    assert torch.equal(need["conv1"], expected)
    masks["conv2"][0, 1, 1] = False   # now the corner (3, 3), feeding only (1, 1), goes too; (0, 1) still feeds (0, 1)
    need = needed(g, masks)
    expected[0, 3, 3] = False
    assert torch.equal(need["conv1"], expected)
    masks["conv2"][:] = False          # nothing reaches the head: nothing is needed
    assert not needed(g, masks)["conv1"].any()


# ------------------------------------------------------------------------------------- brute-force checks
def brute_conv_needs(kept_out: torch.Tensor, c_in: int, size: tuple[int, int], kernel, stride, padding, dilation,
                     groups: int) -> torch.Tensor:
    """Input nodes read by at least one kept output node, by enumerating every receptive field."""
    c_out, oh, ow = kept_out.shape
    need = torch.zeros(c_in, *size, dtype=torch.bool)
    per_group_in, per_group_out = c_in // groups, c_out // groups
    for o in range(c_out):
        g = o // per_group_out
        for a in range(oh):
            for b in range(ow):
                if not kept_out[o, a, b]:
                    continue
                for ki in range(kernel[0]):
                    for kj in range(kernel[1]):
                        i = a * stride[0] - padding[0] + ki * dilation[0]
                        j = b * stride[1] - padding[1] + kj * dilation[1]
                        if 0 <= i < size[0] and 0 <= j < size[1]:
                            need[g * per_group_in:(g + 1) * per_group_in, i, j] = True
    return need


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,size", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, (7, 7)),
    ((3, 3), (2, 2), (1, 1), (1, 1), 1, (8, 7)),
    ((1, 1), (2, 2), (0, 0), (1, 1), 1, (7, 8)),
    ((5, 3), (2, 1), (2, 0), (1, 2), 2, (9, 9)),
    ((3, 3), (3, 3), (0, 0), (1, 1), 4, (10, 10)),
])
def test_conv_needs_matches_receptive_field_enumeration(kernel, stride, padding, dilation, groups, size):
    torch.manual_seed(0)
    c_in, c_out = 4, 4
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups)
    oh = (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    for trial in range(3):
        kept_out = torch.rand(c_out, oh, ow) < (0.1, 0.3, 0.02)[trial]
        ones = torch.ones(c_out, c_in // groups, *kernel)
        got = transpose_cover(kept_out, ones, conv.stride, conv.padding, conv.dilation, groups, size) > 0
        assert torch.equal(got, brute_conv_needs(kept_out, c_in, size, kernel, stride, padding, dilation, groups))


@pytest.mark.parametrize("arch,kwargs", [("resnet20", {"bn": False}), ("resnet20", {}), ("cnn", {}),
                                         ("vgg11", {}), ("mlp", {"hidden": [6, 5]})])
def test_the_bits_of_the_pass_are_what_a_per_sample_loop_counts(arch, kwargs):
    """The pass keeps bits, not counters: each must be what counting every input one at a time gives (per class
    and node: active for some input; active among the first k; how many classes are), the activation counts
    when asked for, and every module's CI + TI masks, with and without tau, what the counters give."""
    torch.manual_seed(1)
    data = random_data(per_class=8)
    net = build(arch, (1, 12, 12), 4, **kwargs).eval().double()  # float64: batch size cannot flip a sign
    spec = InputSpec(1, 12, 12, (0.5,), (0.25,))

    def prepare(images):
        return to_input(images, spec).double()

    graph = ModelGraph(net.float(), (1, 12, 12))
    net.double()
    stats = observe(net, graph, prepare, data, Sampling(7, 3, counts=True), Passes(batch_size=3))
    # bits only, and spilled to memory-mapped files (as a pass past the memory bound is)
    bits_only = observe(net, graph, prepare, data, Sampling(7, 3), Passes(batch_size=5),
                        spill_above=0)
    assert bits_only.counts is None and stats.spill is None
    spilled = bits_only.spill.path
    assert len(list(spilled.iterdir())) == 2 * len(graph.points)  # active and early, per point
    # counts spilled too, in the narrowest type that holds them
    counted = observe(net, graph, prepare, data, Sampling(7, 3, counts=True), Passes(batch_size=2), spill_above=0)
    assert len(list(counted.spill.path.iterdir())) == 3 * len(graph.points)
    for p in graph.points:
        assert stats.counts[p.name].dtype == counted.counts[p.name].dtype == torch.int16
        assert torch.equal(stats.counts[p.name], counted.counts[p.name])
        assert torch.equal(stats.active[p.name], counted.active[p.name])
    order = class_order(data.labels, 4, 3)
    captured = {}
    count = {p.name: torch.zeros(4, *p.shape, dtype=torch.int32) for p in graph.points}
    first = {p.name: torch.full((4, *p.shape), 2**31 - 1, dtype=torch.int32) for p in graph.points}
    with hooks(net, graph.points, lambda p, out: captured.__setitem__(p.name, out[0] > 0)), torch.no_grad():
        for c in range(4):
            for pos, i in enumerate(order[c][:7].tolist()):
                net(prepare(data.images[i:i + 1]))
                for name, active in captured.items():
                    count[name][c] += active.int()
                    first[name][c] = torch.where(active & (first[name][c] == 2**31 - 1), pos, first[name][c])
    k = 7 // 3  # tangling_budget(7, 4)
    assert sorted(stats.early) == [k]
    for p in graph.points:
        for c in range(4):
            assert torch.equal(stats.mine(p, c), count[p.name][c] > 0), (c, p.name)
            assert torch.equal(bits_only.mine(p, c), count[p.name][c] > 0), (c, p.name)
            others = [o for o in range(4) if o != c]
            assert torch.equal(stats.others_early(p, c, k), (first[p.name][others] < k).any(0)), (c, p.name)
            assert torch.equal(stats.count(p, c).int(), count[p.name][c])
        assert torch.equal(stats.any_class(p), (count[p.name] > 0).any(0))
    for tau in (0.0, 0.3):
        for c in range(4):
            got = keep_masks(stats, c, tau)
            for p in graph.points:  # the counters' rule, as the pass kept it before it kept bits
                own = count[p.name][c]
                expected = (own > 0) & (own.float() >= tau * 7) | (first[p.name][[o for o in range(4) if o != c]]
                                                                    < k).any(0)
                assert torch.equal(got[p.name], expected), (tau, c, p.name)
    assert stats.observed.tolist() == [7, 7, 7, 7]
    with pytest.raises(UserError, match="recorded no activation counts"):
        keep_masks(bits_only, 0, 0.3)
    del bits_only
    gc.collect()
    assert not spilled.exists()  # the spill goes with its statistics


@pytest.mark.parametrize("arch,kwargs", [("resnet20", {"bn": False}), ("resnet20", {}), ("vgg11", {}),
                                         ("cnn", {"bn": True})])
def test_marked_features_are_exactly_zero_for_any_input(arch, kwargs):
    """MC-BLN's promise: every node a marked feature summarises is off, so the feature is 0 whatever the input."""
    torch.manual_seed(2)
    net = build(arch, (1, 12, 12), 4, **kwargs).eval()
    with torch.no_grad():
        net.get_submodule(ModelGraph(net, (1, 12, 12)).classifier).weight.normal_(0, 1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.bias.normal_(0, 0.1)
    data = random_data()
    modules = decompose(net, data, "mc-bln")
    x = torch.randn(16, 1, 12, 12) * 2
    from cnnmod.core.masking import masked_features
    from cnnmod.node.method import marked_features

    some_marked = False
    for m in modules:
        marked = marked_features(m.head_weight, 0.5)
        some_marked |= bool(marked.any())
        masks = {k: v.unsqueeze(0) for k, v in m.masks.items()}
        features = masked_features(net, m.points, m.head, masks, x)[0]
        assert torch.all(features[:, marked] == 0)
    assert some_marked


@pytest.mark.parametrize("arch,kwargs", [("resnet20", {"bn": False}), ("resnet20", {}), ("vgg11", {}),
                                         ("cnn", {}), ("mlp", {"hidden": [8, 8]})])
@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_mc_bi_switches_off_only_nodes_that_cannot_matter(arch, kwargs, keep):
    """Nodes MC-BI removes feed only switched-off nodes: the module's scores are unchanged for any input."""
    torch.manual_seed(3)
    net = build(arch, (1, 12, 12), 4, **kwargs).eval()
    with torch.no_grad():
        net.get_submodule(ModelGraph(net, (1, 12, 12)).classifier).weight.normal_(0, 1)
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)])
    graph = ModelGraph(net, (1, 12, 12))
    g = torch.Generator().manual_seed(0)
    masks = {}
    for p in graph.points:  # random masks: whole channels off, and scattered nodes off in the others
        channel_on = torch.rand(p.shape[0], generator=g) < keep
        node_on = torch.rand(p.shape, generator=g) < keep
        masks[p.name] = node_on & channel_on.view(-1, *([1] * (len(p.shape) - 1)))
    live = needed(graph, masks)
    pruned = {k: v & live[k] for k, v in masks.items()}
    w, b = binary_head(net.get_submodule(graph.classifier).weight, net.get_submodule(graph.classifier).bias, 1)
    before, after = Module(clf, graph, 1, masks, w, b), Module(clf, graph, 1, pruned, w, b)
    if keep < 0.5 and arch in ("resnet20", "cnn"):  # sparse masks there leave nodes that cannot matter
        assert after.kept_nodes() < before.kept_nodes()
    x = torch.randn(8, 1, 12, 12)
    assert torch.allclose(before(x), after(x), atol=1e-5)
    # and the decomposition's MC-BI only ever removes nodes from MC-BLN's
    data = random_data(per_class=3)
    bln = decompose(net, data, "mc-bln")
    bi = decompose(net, data, "mc-bi")
    for m_bln, m_bi in zip(bln, bi, strict=True):
        assert all(not (m_bi.masks[k] & ~m_bln.masks[k]).any() for k in m_bln.masks)
        assert torch.allclose(m_bln(x), m_bi(x), atol=1e-5)


def test_module_keeping_everything_is_the_model_head():
    torch.manual_seed(4)
    net = build("resnet20", (1, 12, 12), 5).eval()
    with torch.no_grad():
        net.fc.weight.normal_(0, 1)
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(5)])
    graph = ModelGraph(net, (1, 12, 12))
    full = {p.name: torch.ones(p.shape, dtype=torch.bool) for p in graph.points}
    x = torch.randn(10, 1, 12, 12)
    logits = net(x).detach()
    modules = []
    scratch = torch.empty(4, net.fc.weight.shape[1])
    for c in range(5):
        w, b = binary_head(net.fc.weight, net.fc.bias, c)
        ws, bs = binary_head(net.fc.weight, net.fc.bias, c, scratch)  # the loop's way: no copy per class
        assert torch.equal(w, ws) and torch.equal(b, bs)
        m = Module(clf, graph, c, full, w, b)
        others = [o for o in range(5) if o != c]
        expected = F.softmax(torch.stack([logits[:, c], logits[:, others].mean(1)], 1), 1)[:, 0]
        assert torch.allclose(m.score(x), expected, atol=1e-5)
        modules.append(m)
    images = torch.randint(0, 256, (10, 1, 12, 12), dtype=torch.uint8)
    assert torch.equal(compose(modules).predict(images), net(clf.prepare(images)).argmax(1))


def test_same_seed_same_modules():
    torch.manual_seed(5)
    net = build("cnn", (1, 12, 12), 4).eval()
    data = random_data()
    a = decompose(net, data, "mc-bi", settings=DecomposeSettings(seed=7, ci_samples=5))
    b = decompose(net, data, "mc-bi", settings=DecomposeSettings(seed=7, ci_samples=5))
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x.masks[k], y.masks[k]) for k in x.masks)
        assert torch.equal(x.head_weight, y.head_weight)


def direct_vote(row: list[float]) -> int:
    voters = [i for i, p in enumerate(row) if p > 0.5]
    if len(voters) == 1:
        return voters[0]
    pool = voters if voters else list(range(len(row)))
    best = max(row[i] for i in pool)
    return min(i for i in pool if row[i] == best)


def test_vote_rule_against_direct_implementation():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(500, 6, generator=g)
    scores = (scores * 8).round() / 8   # many exact ties, some exactly 0.5 (which does not vote)
    expected = [direct_vote(r) for r in scores.tolist()]
    assert vote(scores).tolist() == expected
    assert vote(torch.tensor([[0.5, 0.4], [0.2, 0.2], [0.9, 0.9]])).tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- bad input
def test_refuses_non_relu_and_untraceable_models():
    data = random_data()
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 10 * 10, 4))
    with pytest.raises(UserError, match="ReLU"):
        decompose(net, data)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 4)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = -y
            return self.fc(y.mean((2, 3)))

    with pytest.raises(UserError, match="trace"):
        decompose(Branchy(), data)


def test_refuses_mismatched_data_and_empty_classes():
    net = build("cnn", (1, 12, 12), 4).eval()
    three = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), ["a", "b", "c"])
    with pytest.raises(UserError, match="3 classes but the data set rand has 4"):
        decompose(three, random_data(classes=4))
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), ["a", "b", "c", "d"])
    with pytest.raises(UserError, match="takes 1x12x12"):
        decompose(clf, random_data(shape=(1, 8, 8)))
    data = random_data()
    empty = ImageSet("rand", "train", data.images[data.labels != 2], data.labels[data.labels != 2],
                     data.class_names, (0.5,), (0.25,))
    with pytest.raises(UserError, match="no training images"):
        decompose(clf, empty)
    with pytest.raises(UserError, match="variant"):
        decompose(clf, data, "mc-xyz")


def test_composition_refuses_mixed_shapes_and_duplicates():
    a_net, b_net = build("cnn", (1, 12, 12), 4).eval(), build("cnn", (1, 8, 8), 4).eval()
    a = decompose(a_net, random_data())
    b = decompose(b_net, random_data(shape=(1, 8, 8)))
    with pytest.raises(UserError, match="input shapes"):
        compose([a[0], b[1]])
    with pytest.raises(UserError, match="two modules for class 0"):
        compose([a[0], a[1], a[0]])
    # two source models of one input shape compose; each column is that module's own score
    c_net = build("cnn", (1, 12, 12), 4).eval()
    c = decompose(c_net, random_data(seed=1))
    mixed = compose([a[0], c[1], a[2]])
    assert len(mixed.groups) == 2
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    scores = mixed(images)
    for i, m in enumerate([a[0], c[1], a[2]]):
        assert torch.allclose(scores[:, i], m.score(m.prepare(images)), atol=1e-6)


@pytest.mark.parametrize("arch,kwargs,shape", [
    ("resnet20", {}, (1, 12, 12)), ("resnet32", {"bn": False}, (1, 12, 12)), ("resnet56", {}, (1, 8, 8)),
    ("resnet18", {}, (3, 32, 32)), ("resnet34", {"stem": "cifar", "bn": False}, (3, 16, 16)),
    ("vgg11", {"bn": False}, (1, 12, 12)), ("vgg16", {}, (3, 16, 16)), ("mlp", {"hidden": [7, 6, 5]}, (1, 6, 6)),
    ("cnn", {"bn": True}, (1, 12, 12)),
])
def test_every_zoo_model_decomposes(arch, kwargs, shape):
    torch.manual_seed(6)
    net = build(arch, shape, 3, **kwargs).eval()
    data = random_data(shape=shape, classes=3, per_class=4)
    graph = ModelGraph(net, shape)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len([p for p in graph.points if p.kind == "conv"]) == len(convs)  # every convolution is observed
    variants = {v: decompose(net, data, v) for v in ("mc", "mc-bln", "mc-bi")}
    images = data.images[:5]
    for c in range(3):
        a, b, d = (variants[v][c] for v in ("mc", "mc-bln", "mc-bi"))
        for name in a.masks:  # each variant only switches more nodes off
            assert not (b.masks[name] & ~a.masks[name]).any() and not (d.masks[name] & ~b.masks[name]).any()
        p = d.score(d.prepare(images))
        assert p.shape == (5,) and bool(((p >= 0) & (p <= 1)).all())
    assert compose(variants["mc-bi"]).predict(images).shape == (5,)
