"""Slim modules: physically smaller networks that compute exactly what the gated model computes."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, random_data, run, slim_with_reference, source

import cnnmod
from cnnmod.composition.fitting import calibration_set
from cnnmod.core.calibrate import TYPICAL_ALPHA, fit_head, source_log_odds, typicality
from cnnmod.core.graph import ModelGraph
from cnnmod.core.observe import class_order
from cnnmod.data.transforms import InputSpec
from cnnmod.errors import UserError
from cnnmod.models import build
from cnnmod.models.classifier import Classifier
from cnnmod.models.train import split_train_val
from cnnmod.slim import ModuleMaker, SlimSettings, slim_module, slim_modules
from cnnmod.slim.channels import classifier_input, cost_per_channel, frozen_copy, gated, reestimate_bn
from cnnmod.slim.importance import Fisher, Taylor
from cnnmod.slim.make import Pools, source_margin
from cnnmod.slim.pruner import Margins, Pruner, step_rows
from cnnmod.slim.recovery import FinalRefit, Reconstruct, Scales
from cnnmod.slim.schedule import candidates, close, close_step, step_share, take


@pytest.mark.parametrize("arch,kwargs", [("resnet20", {}), ("resnet20", {"bn": False}), ("vgg11", {}),
                                         ("cnn", {}), ("mlp", {"hidden": [16, 12]})])
def test_sliced_network_computes_what_the_gated_model_computes(arch, kwargs):
    clf = source(arch, **kwargs)
    data = random_data(per_class=20)
    # pruning steps on 16 of the 100 observed inputs; the last refit on all of them
    m, (net, graph, groups, gates, hw, hb) = slim_with_reference(
        clf, data, 1, SlimSettings(size=0.4, samples=40, step=0.2, step_samples=16))
    assert m.metrics["params_fraction"] <= 0.4
    assert m.params() == sum(p.numel() for p in m.net.parameters()) < sum(p.numel() for p in clf.net.parameters())
    assert all(int(g.sum()) >= 1 for g in gates)  # every channel group keeps a channel
    x = torch.randn(9, 1, 12, 12)
    with torch.no_grad(), gated(net, graph, groups, gates):
        features = classifier_input(net, graph.head, lambda: net(x))
    expected = features @ hw.T + hb  # a closed channel is not read: its features are 0
    with torch.no_grad():
        assert torch.allclose(m(x), expected, atol=1e-4)
    # the source model was not touched
    assert sum(p.numel() for p in clf.net.parameters()) == sum(p.numel() for p in build(arch, (1, 12, 12), 4,
                                                                                          **kwargs).parameters())


def test_narrowing_the_network_as_channels_close_changes_nothing_but_its_cost():
    """The pruner narrows its network to the open channels after every step (:meth:`Pruner.narrow`); without it,
    every pass runs on the full network with the closed channels gated. Made to close the same channels, the two
    compute the same at every step: the same channels removed, the same BatchNorm statistics on the channels
    kept, the same Fisher scores, the same margins (the head's logistic fit to its tolerance: it decays the
    gated network's dead columns too, so each step starts from the gated one's head), the same least-squares
    refit, and with the scales learned narrowed carried over to the gated network, after the last head fit, sliced
    modules that score new inputs alike; the narrowed network has fewer channels at every step."""
    clf = source("resnet20")
    data = random_data(per_class=20)
    s = SlimSettings(size=0.4, samples=40, step=0.3, step_samples=16, rule="fisher", reconstruct=True,
                     scale_epochs=2, scale_bn=True).resolved(0.5)
    a = ModuleMaker(clf, data, 1, s).pruner  # refreshed once, on the observed inputs
    w, bias = source_margin(a.graph.head.linear_map(clf.net), 1)
    b = Pruner(clf, s, Margins(a.x_obs, a.targets, a.soft, w[None], torch.tensor([bias])), narrows=False)
    b.refresh()
    full = sum(g.numel() for g in b.gates)
    x = a.x_obs
    for _ in range(3):
        scores_a, scores_b = Fisher()(a.view()), Fisher()(b.view())
        for sa, sb, origin in zip(scores_a, scores_b, a.origin, strict=True):
            assert torch.allclose(sa, sb[origin], rtol=1e-3, atol=1e-6 * float(sb.max()))
        ranked = candidates(a)
        chosen = take([(v, 0, i, j) for v, i, j in ranked], step_share(s, a.fraction()) * a.total_params, [a])
        close(a, [(i, j) for _, i, j in chosen], ranked)
        close(b, [(i, int(a.origin[i][j])) for _, i, j in chosen], [])  # the same channels, in the full network
        a.refresh()
        b.refresh()
        assert a.removed() == b.removed() and any(a.removed().values())
        assert sum(g.numel() for g in a.gates) == a.kept_channels() == b.kept_channels() < full
        theirs, kept = dict(b.net.named_modules()), a.kept_outputs()
        for name, m in a.net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert torch.allclose(m.running_var, theirs[name].running_var[kept.get(name, slice(None))], rtol=1e-4)
        za = a.features_of(x) @ a.w.T + a.b.float()
        zb = b.features_of(x) @ b.w.T + b.b.float()
        assert torch.allclose(za, zb, atol=1e-3 * float(zb.abs().max()))
        a.w, a.b = b.w[:, a.head_columns()].clone(), b.b.clone()  # the same head on: the steps compare exactly
    def margins():
        return a.features_of(x) @ a.w.T + a.b.float(), b.features_of(x) @ b.w.T + b.b.float()

    for p in (a, b):
        Reconstruct()(p)  # least squares, ridge over the inputs each layer reads: the same in both
    za, zb = margins()
    assert torch.allclose(za, zb, atol=1e-3 * float(zb.abs().max()))
    a.w, a.b = b.w[:, a.head_columns()].clone(), b.b.clone()
    # the scales learned on the narrowed network, carried over to the gated one, compute there what they compute
    # narrowed (learning them on each apart would compare Adam's rounding: its first steps move every scale by
    # about its rate whatever its gradient's size, and a difference of 1e-4 in the margins becomes 0.1 in a scale)
    Scales(s.scale_epochs, s.scale_bn)(a)
    kept = a.kept_outputs()
    for gate_b, gate_a, origin in zip(b.gates, a.gates, a.origin, strict=True):
        gate_b[origin] = gate_a
    theirs = dict(b.net.named_modules())
    with torch.no_grad():
        for name, m in a.net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for q in ("weight", "bias"):
                    getattr(theirs[name], q)[kept.get(name, slice(None))] = getattr(m, q)
    b.refresh()
    for p in (a, b):
        FinalRefit()(p)
    new = clf.prepare(random_data(per_class=4, seed=3).images)
    with torch.no_grad():
        za, zb = a.sliced(check=True)(new), b.sliced(check=True)(new)
    assert torch.allclose(za, zb, atol=1e-3 * float(zb.abs().max()))
    assert sum(q.numel() for q in a.sliced().parameters()) == sum(q.numel() for q in b.sliced().parameters())


def test_log_odds_are_the_softmax_probability_of_each_class():
    torch.manual_seed(1)
    net = torch.nn.Linear(5, 4)
    x = torch.randn(30, 5)
    p = torch.softmax(net(x).double(), 1)
    assert torch.allclose(torch.sigmoid(source_log_odds(net, x, batch_size=7).double()), p, atol=1e-6)
    # among some classes only: the model restricted to them, its softmax over their logits, in their order
    restricted = torch.softmax(net(x).double()[:, [3, 1]], 1)
    assert torch.allclose(torch.sigmoid(source_log_odds(net, x, 7, [3, 1]).double()), restricted, atol=1e-6)


def test_head_fitted_to_a_teachers_probabilities_recovers_the_teacher():
    torch.manual_seed(2)
    f = torch.randn(4000, 6)
    w_true, b_true = torch.tensor([1.5, -2.0, 0.0, 0.5, 1.0, -0.7]), -0.4
    soft = torch.sigmoid(f @ w_true + b_true)
    mine = soft > 0.5
    w, b = fit_head(f, mine, torch.zeros(6), 0.0, l2=0.0, soft=soft)
    # class balancing reweights the inputs, not the teacher: the teacher's own weights are the optimum
    assert torch.allclose(w, w_true, atol=0.02) and abs(b - b_true) < 0.02


def test_cost_per_channel_counts_every_coupled_layer():
    clf = source("cnn")  # 1x12x12 -> conv 16 (3x3) -> pool -> conv 32 (3x3) -> pool -> 32x3x3 -> dense 64 -> head
    from cnnmod.slim.channels import frozen_copy

    graph, net, groups = frozen_copy(clf.net, clf.spec.shape)
    roots = [g.root for g in groups.groups]
    params = dict(zip(roots, cost_per_channel(net, groups, clf.spec.shape, graph.head, "params"), strict=True))
    assert params["conv1"] == 1 * 9 + 1 + 32 * 9         # its kernel and bias, and conv2's input slice
    assert params["conv2"] == 16 * 9 + 1 + 3 * 3 * 64    # its kernel and bias, 9 flattened inputs of the dense
    assert params["fc1"] == 32 * 9 + 1 + 2               # a hidden unit: row, bias, the 2-way head's column
    # FLOPs per image (2 per multiply-add): a channel's own outputs and the next layer's work on them
    flops = dict(zip(roots, cost_per_channel(net, groups, clf.spec.shape, graph.head, "flops"), strict=True))
    assert flops["conv1"] == 2 * 9 * 12 * 12 + 2 * 32 * 9 * 6 * 6   # 3x3 at 12x12; conv2 reads it at 6x6
    assert flops["conv2"] == 2 * 16 * 9 * 6 * 6 + 2 * 9 * 64        # 16 inputs at 6x6; 9 features into the dense
    assert flops["fc1"] == 2 * 32 * 9 + 2 * 2


def test_channel_counts_stay_multiples_when_asked():
    clf = source("cnn")
    data = random_data(per_class=20)
    for multiple in (1, 4):
        m = slim_module(clf, data, 1, SlimSettings(size=0.2, samples=40, step=0.2, multiple=multiple))
        widths = [m.net.conv1.out_channels, m.net.conv2.out_channels, m.net.fc1.out_features]
        assert m.metrics["params_fraction"] <= 0.2
        if multiple == 1:  # left to itself the pruner lands on counts of any kind
            assert any(w > 4 and w % 4 for w in widths), widths
        else:  # above the multiple, every layer keeps a multiple of it
            assert all(w <= 4 or w % 4 == 0 for w in widths), widths


def test_residual_channels_are_cut_together():
    clf = source("resnet20")
    m = slim_module(clf, random_data(per_class=20), 0, SlimSettings(size=0.3, samples=40, step=0.2))
    net = m.net
    for stage in (net.layer1, net.layer2, net.layer3):  # every block of a stage adds into the same channels
        widths = {block.conv2.out_channels for block in stage}
        assert len(widths) == 1
    assert net.fc.out_features == 2 and net.fc.in_features == net.layer3[2].conv2.out_channels


@pytest.mark.parametrize("step_samples", [None, 12])
def test_max_loss_keeps_held_out_accuracy(step_samples):
    clf, data = source("cnn"), random_data(per_class=30)
    m = slim_module(clf, data, 2, SlimSettings(size=0.01, max_loss=0.0, samples=40, held_out=10, step=0.2,
                                               step_samples=step_samples))
    assert m.metrics["held_out_binary_accuracy"] >= m.metrics["held_out_binary_accuracy_start"]
    # the recorded figure is the saved module's own on the held-out inputs (no validation split on record: the last
    # 10 of each class's seeded order), up to one image whose margin the float64 head and the module's float32
    # one put on either side of 0
    held = Pools(clf, data, 0).held_out(list(range(4)), 10)
    with torch.no_grad():
        mine = m(clf.prepare(data.images[held])).argmax(1) == 0
    accuracy = 100.0 * float((mine == (data.labels[held] == 2)).float().mean())
    assert abs(accuracy - m.metrics["held_out_binary_accuracy"]) <= 100.0 / len(held) + 1e-9


def test_a_step_works_on_inputs_spread_over_the_classes():
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 20, 20]))  # as observed: mine, then blocks
    rows = step_rows((labels == 0)[:, None], 24)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 24
    assert torch.bincount(labels[rows], minlength=4).tolist() == [12, 4, 4, 4]
    assert step_rows((labels == 0)[:, None], 100) is None and step_rows((labels == 0)[:, None], None) is None
    several = torch.stack([labels == 0, labels == 1], 1)  # a merged composition's rows: all inputs alike
    assert torch.bincount(labels[step_rows(several, 10)], minlength=4).tolist() == [4, 2, 2, 2]
    few = torch.zeros(50, 1, dtype=torch.bool)
    few[:3] = True  # fewer of mine than half: the rest from the others
    assert len(step_rows(few, 20)) == 20 and int(few[step_rows(few, 20), 0].sum()) == 3


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2"])
def test_fisher_is_each_inputs_own_gate_gradient_squared(arch):
    """``fisher`` against a brute-force loop: each input alone through the gated network (BatchNorm on its running
    statistics, so inputs do not meet), its share of the class-balanced loss (1/2 over the class's inputs, 1/2
    over the others'), the gradient with respect to one gate per channel; N times the sum of their squares. The
    same gradients summed are the batch's (Taylor's, before its absolute value). Some gates are closed first."""
    clf = source(arch, **({"width_mult": 0.25} if arch == "mobilenet_v2" else {}))
    data = random_data(per_class=6)
    x = clf.prepare(data.images)
    targets = (data.labels == 2)[:, None]
    frozen = frozen_copy(clf.net, clf.spec.shape)
    hw, hb = frozen[0].head.linear_map(frozen[1])
    p = Pruner(clf, SlimSettings(size=0.5, step_samples=None),
               Margins(x, targets, None, (hw[2] - hw[0])[None], (hb[2] - hb[0])[None]), frozen=frozen)
    g = torch.Generator().manual_seed(1)
    for gate in p.gates:
        gate[torch.rand(gate.shape, generator=g) < 0.2] = 0.0
    n, pos = x.shape[0], int(targets.sum())
    fisher, summed = [torch.zeros_like(gate) for gate in p.gates], [torch.zeros_like(gate) for gate in p.gates]
    for i in range(n):
        live = [gate.clone().requires_grad_(True) for gate in p.gates]
        with gated(p.net, p.graph, p.groups, live):
            f = classifier_input(p.net, p.graph.head, lambda i=i: p.net(x[i:i + 1]))
        z = f @ p.w[0].float() + float(p.b[0])
        weight = 0.5 / pos if bool(targets[i, 0]) else 0.5 / (n - pos)
        loss = weight * torch.nn.functional.binary_cross_entropy_with_logits(z, targets[i].float())
        for k, gr in enumerate(torch.autograd.grad(loss, live, allow_unused=True)):
            if gr is not None:
                fisher[k] += n * gr.pow(2)
                summed[k] += gr
    got, taylor = Fisher()(p.view()), Taylor()(p.view())
    assert len(got) == len(fisher) and sum(int((f > 0).sum()) for f in fisher) > 20
    # float32 throughout, summed in another order (a batch against one input at a time): each gradient agrees to a
    # few hundred float32 roundings of the largest one, and a square doubles the relative error
    for a, b, s, ta in zip(got, fisher, summed, taylor, strict=True):
        assert torch.allclose(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()) + 1e-12)
        assert torch.allclose(ta, s.abs(), rtol=1e-3, atol=1e-3 * float(s.abs().max()) + 1e-9)


def test_the_last_refit_is_on_every_observed_input():
    """Pruning steps refit the head on the step's inputs; ``finish`` refits it on all observed ones: the head is
    then exactly the logistic fit of the current network's features of all of them."""
    clf = source("cnn")
    data = random_data(per_class=20)
    x = clf.prepare(data.images)
    targets = (data.labels == 1)[:, None]
    frozen = frozen_copy(clf.net, clf.spec.shape)
    hw, hb = frozen[0].head.linear_map(frozen[1])
    p = Pruner(clf, SlimSettings(size=0.5, step_samples=10),
               Margins(x, targets, None, (hw[1] - hw[0])[None], (hb[1] - hb[0])[None]), frozen=frozen)
    p.refresh()
    on_step = p.w.clone()
    close_step(p, 1.0)
    p.refresh()
    FinalRefit()(p)
    expected = fit_head(p.features_of(x), targets[:, 0], p.w[0], float(p.b[0]))  # a fixed point of the fit
    assert torch.allclose(p.w[0], expected[0], atol=1e-4)
    p.refit(step=True)
    assert not torch.allclose(p.w[0], expected[0], atol=1e-3)  # 10 inputs fit another head
    assert on_step.shape[0] == p.w.shape[0] == 1
    assert p.w.shape[1] == p.features_of(x[:1]).shape[1] < on_step.shape[1]  # the features the narrowed network has


def test_one_pass_re_estimates_batchnorm_and_gives_the_eval_passs_features():
    """A step's refresh re-estimates BatchNorm on the step's inputs and refits the head on their features in one
    pass (they fit in one batch): every BatchNorm layer then holds the mean and the (biased) variance of what it
    reads in an eval pass over those inputs, and the head is the logistic fit of that pass's features."""
    clf = source("resnet20")
    data = random_data(per_class=20)
    s = SlimSettings(size=0.5, samples=40, step=0.3, step_samples=24, rule="fisher").resolved(0.5)
    p = ModuleMaker(clf, data, 1, s).pruner
    close_step(p, 1.0)
    before = {n: m.running_var.clone() for n, m in p.net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    p.refresh()
    x, targets, soft = p.step_view()
    seen = {}
    bns = {n: m for n, m in p.net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    handles = [m.register_forward_pre_hook(lambda m, i, n=n: seen.__setitem__(n, i[0])) for n, m in bns.items()]
    features = p.features_of(x)  # eval mode
    for h in handles:
        h.remove()
    for n, m in bns.items():
        values = seen[n].transpose(0, 1).flatten(1).double()
        assert torch.allclose(m.running_mean.double(), values.mean(1), atol=1e-5)
        assert torch.allclose(m.running_var.double(), values.var(1, unbiased=False), rtol=1e-4, atol=1e-6)
    assert any(before[n].shape != m.running_var.shape or not torch.allclose(before[n], m.running_var)
               for n, m in bns.items())  # re-estimated after the channels closed
    expected = fit_head(features, targets[:, 0], p.w[0], float(p.b[0]), soft=soft[:, 0])  # a fixed point of the fit
    assert torch.allclose(p.w[0], expected[0], atol=1e-4)

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    xb, out = torch.randn(5, 3, 8, 8), []
    assert reestimate_bn(net, lambda: out.append(net(xb)), one_batch=True)
    with torch.no_grad():
        assert torch.allclose(net(xb), out[0], atol=1e-5)
    one = net[1].running_var.clone()
    # two batches (or a BatchNorm a network runs twice): not exact, and the statistics average the runs as ever
    assert not reestimate_bn(net, lambda: [net(xb), net(xb[:3])], one_batch=True)
    plain = copy.deepcopy(net)
    reestimate_bn(plain, lambda: [plain(xb), plain(xb[:3])])
    assert torch.allclose(net[1].running_var, plain[1].running_var) and not torch.allclose(net[1].running_var, one)


def test_modules_made_together_share_the_sources_probabilities():
    """``slim_modules`` computes the source's probabilities once for all modules: the same modules made together
    as made apart (what torchrun's processes do), and close to ``slim_module``'s own."""
    clf, data = source("resnet20", width=8), random_data(per_class=20)
    s = SlimSettings(size=0.4, samples=30, step=0.2, step_samples=24)
    together = slim_modules(clf, data, [0, 2], s)
    x = torch.randn(5, 1, 12, 12)
    for m in together:
        apart = slim_modules(clf, data, [m.concerned], s)[0]
        assert m.removed == apart.removed
        with torch.no_grad():
            assert torch.equal(m(x), apart(x))
    alone = slim_module(clf, data, 0, s)
    assert abs(alone.metrics["params_fraction"] - together[0].metrics["params_fraction"]) < 0.05


def test_observed_inputs_are_trained_on_and_held_out_ones_never():
    """With the model's validation split on record, slim modules observe only images it was trained on and
    measure their losses only on images it never trained on; without, held out are the last of each class."""
    data = random_data(per_class=30)
    clf = source("cnn")
    pools = Pools(clf, data, seed=3)
    order = class_order(data.labels, data.num_classes, 3)
    assert pools.held_out_from == "training"
    assert pools.held_out([1], 5).tolist() == order[1][-5:].flip(0).tolist()
    assert pools.observation(2, 8).tolist() == torch.cat([order[2][:8]] + [order[c][:2] for c in (0, 1, 3)]).tolist()
    clf.info["training"] = {"data": "rand", "val_split": 0.25, "seed": 7, "subset": None}
    pools = Pools(clf, data, seed=3)
    trained, validated = split_train_val(data, 0.25, None, 7)  # as training split it
    fingerprint = {bytes(x.numpy()): "trained" for x in trained.images} | {
        bytes(x.numpy()): "validated" for x in validated.images}
    assert pools.held_out_from == "validation"
    observed = pools.observation(0, 1000)
    held = pools.held_out([0, 1, 2, 3], 1000)
    assert {fingerprint[bytes(data.images[i].numpy())] for i in observed} == {"trained"}
    assert {fingerprint[bytes(data.images[i].numpy())] for i in held} == {"validated"}
    assert len(held) == len(validated) and len(observed) == len(trained)  # all of both, asked for more
    for c in range(4):  # each pool keeps the seeded order
        kept = [i for i in order[c].tolist() if i in set(pools.held_out([c], 1000).tolist())]
        assert kept == pools.held_out([c], 1000).tolist()
    # another data set or other classes than the model's: no split to go by
    assert Pools(clf, data.subset([0, 1, 2]), 3).held_out_from == "training"
    clf.info["training"]["data"] = "other"
    assert Pools(clf, data, 3).held_out_from == "training"


class FixedShuffle(torch.nn.Module):
    """A channel shuffle written for exactly 8 channels: torch-pruning slices it without complaint, and the
    sliced network then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU()
        self.conv2, self.relu2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = x.view(x.size(0), 2, 4, 12, 12).transpose(1, 2).reshape(x.size(0), 8, 12, 12)
        return self.fc(self.pool(self.relu2(self.conv2(x))).flatten(1))


class ShuffleOnly(torch.nn.Module):
    """One convolution whose 8 channels go through a shuffle written for exactly 8: nothing can be sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU()
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = x.view(x.size(0), 2, 4, 12, 12).transpose(1, 2).reshape(x.size(0), 8, 12, 12)
        return self.fc(self.pool(x).flatten(1))


def test_channel_groups_torch_pruning_cannot_slice_are_kept_whole_and_named():
    torch.manual_seed(0)
    clf = Classifier(FixedShuffle().eval(), InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)])
    m, (net, graph, groups, gates, hw, hb) = slim_with_reference(
        clf, random_data(per_class=20), 1, SlimSettings(size=0.4, samples=40, step=0.2))
    assert [layer for layer, _ in groups.unsliceable] == ["conv1"]  # its channels meet the fixed reshape
    assert [g.roots for g in groups.groups] == [["conv2"]]
    assert not m.removed.get("conv1") and m.removed["conv2"]
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad(), gated(net, graph, groups, gates):
        expected = classifier_input(net, graph.head, lambda: net(x)) @ hw.T + hb
        assert torch.allclose(m(x), expected, atol=1e-4)
    clf = Classifier(ShuffleOnly().eval(), InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"r{c}" for c in range(4)])
    with pytest.raises(UserError, match=r"ShuffleOnly has no channels that torch-pruning can slice \(conv1: .*"
                                        r"granularity node"):
        slim_module(clf, random_data(per_class=20), 1, SlimSettings(size=0.4, samples=40, step=0.2))


def test_slim_decomposition_command_and_artifacts(tmp_path, npz_data, capsys):
    rc, _, err = run(["train", "--arch", "resnet20", "--arch-arg", "width=8", "--data", npz_data, "--epochs", "2",
                      "--batch-size", "16",
                      "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    out = tmp_path / "slim"
    rc, stdout, err = run(["decompose", str(tmp_path / "m"), "--out", str(out), "--granularity", "channel",
                           "--size", "0.5", "--set", "samples=30", "--set", "step=0.3", "--json"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    # the best recipe for half the parameters (cheap): one budget, the ten modules hold half on average
    fractions = [e["params_fraction"] for e in result["modules"]]
    assert result["variant"] == "channel" and sum(fractions) / len(fractions) <= 0.5
    modules = cnnmod.load_modules(out)
    assert {m.settings["step"] for m in modules} == {0.3}  # as asked, and saved with each module
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    scores = cnnmod.compose(modules)(images)
    # a slim module loads without its source model and scores the same
    alone = tmp_path / "alone"
    shutil.copytree(out / "modules" / "c01-band1", alone)
    moved = cnnmod.load_module(alone)
    assert torch.equal(moved.score(moved.prepare(images)), scores[:, 1])
    # calibrated as node-level modules are: Platt fits and the in-distribution test, saved with the module
    assert all(m.calibration and m.typical is not None for m in modules) and moved.typical is not None
    comp = cnnmod.compose(modules, calibration="platt-ood")
    with torch.no_grad():
        assert torch.allclose(moved.score(moved.prepare(images), "platt-ood"), comp(images)[:, 1], atol=1e-6)
        held = calibration_set(cnnmod.data.load(npz_data, "train"), 100, 0)
        noise = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        own_gate, noise_gate = (typicality(modules[0].typical, comp.group_layers(comp.groups[0], x)[0])
                                for x in (held.images, noise))
    assert float((own_gate > 0.999).float().mean()) == pytest.approx(1 - TYPICAL_ALPHA, abs=0.05)
    assert float(noise_gate.max()) < 2 / ((modules[0].typical["held"].numel() + 1) * TYPICAL_ALPHA)
    rc, stdout, err = run(["evaluate", str(out), "--json", "--latency-batch", "4"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["cost"]["module_mean"]["params_fraction"] <= 0.5 and r["model_top1"] is not None
    assert {(m.settings["recipe"], m.settings["step_samples"]) for m in modules} == {("cheap", 64)}
    # a named recipe: its fields, but for the flags given beside it
    rc, stdout, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "cheap"), "--granularity",
                           "channel", "--recipe", "cheap", "--size", "0.6", "--set", "samples=30",
                           "--set", "measure=false", "--json"], capsys)
    assert rc == 0, err
    made = cnnmod.load_modules(tmp_path / "cheap")
    assert {(m.settings["recipe"], m.settings["size"], m.settings["samples"], m.settings["budget"],
             m.settings["step"], m.settings["step_samples"], m.settings["reconstruct"], m.settings["rule"])
            for m in made} == {("cheap", 0.6, 30, "total", 0.5, 64, True, "fisher")}
    assert sum(e["params_fraction"] for e in json.loads(stdout)["modules"]) / len(made) <= 0.6
    card = (tmp_path / "cheap" / "modules" / "c00-band0" / "README.md").read_text()
    assert "made with the recipe 'cheap'" in card and "by least squares" in card
    # slim and node-level modules of one model compose together
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "node")], capsys)
    assert rc == 0, err
    rc, _, err = run(["compose", str(out / "modules" / "c00-band0"), str(tmp_path / "node" / "modules" / "c02-band2"),
                      "--out", str(tmp_path / "mixed")], capsys)
    assert rc == 0, err
    assert len(cnnmod.load_modules(tmp_path / "mixed")) == 2
    # Fisher and one budget for all modules, every recovery, from the command line: the mean holds, the settings
    # saved
    rc, stdout, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "gates"), "--granularity",
                           "channel", "--size", "0.4", "--set", "samples=30", "--set", "rule=fisher",
                           "--set", "budget=total", "--set", "scale_epochs=2", "--set", "scale_bn=true",
                           "--set", "joint_heads=3",
                           "--set", "reconstruct=true", "--set", "measure=false"], capsys)
    assert rc == 0, err
    assert "then their heads refitted together (weight 3)" in err
    # the readable summary on stdout: a row per module, its pruning history left to --json
    caption = " ".join(stdout.split())  # the caption under the table, as wrapped to the terminal
    assert "history, joint_heads: with --json" in caption and "'params_fraction'" not in stdout
    assert all(f"band{c}" in stdout for c in range(3))
    made = cnnmod.load_modules(tmp_path / "gates")
    assert sum(m.metrics["params_fraction"] for m in made) / len(made) <= 0.4
    recorded = {(m.settings["rule"], m.settings["budget"], m.settings["scale_epochs"],
                 m.settings["scale_bn"], m.settings["joint_heads"], m.settings["reconstruct"]) for m in made}
    assert recorded == {("fisher", "total", 2, True, 3.0, True)}
    card = (tmp_path / "gates" / "modules" / "c00-band0" / "README.md").read_text()
    assert "2 epochs, convolutions frozen: a scale per kept channel" in card and "BatchNorm layer's scale" in card
    assert "head refitted together with the other classes' modules (weight 3" in card
    assert "by least squares, so that each layer's outputs match the source model's" in card
    # the joint refit starts from the heads each fitted alone and minimises the sum of both losses: the joint loss
    # does not rise (to float64 rounding of a loss near 1e-6, plus the optimiser's tolerance)
    fit = made[0].metrics["joint_heads"]
    assert fit["weight"] == 3.0 and fit["joint_after"] <= fit["joint_before"] * (1 + 1e-3) + 1e-9


def test_slim_bad_input(tmp_path, npz_data, capsys):
    rc, _, err = run(["train", "--arch", "cnn", "--data", npz_data, "--epochs", "1", "--out", str(tmp_path / "m")],
                     capsys)
    assert rc == 0, err
    for args, needle in ((["--granularity", "channel", "--size", "0"], "--size"),
                         (["--granularity", "channel", "--size", "1.5"], "--size"),
                         (["--granularity", "node", "--size", "0.5"], "--granularity channel"),
                         (["--granularity", "edge"], "unknown granularity"),
                         (["--granularity", "channel", "--set", "rule=magic"], "importance rule"),
                         (["--granularity", "channel", "--set", "cost=watts"], "unknown slim cost 'watts'"),
                         (["--granularity", "channel", "--set", "budget=all"], "unknown slim budget 'all'"),
                         (["--granularity", "channel", "--set", "budget=total", "--max-loss", "1"],
                          "does not take --max-loss"),
                         (["--granularity", "channel", "--set", "step=1"],
                          "step (--set step=...), the share of the kept"),
                         (["--granularity", "channel", "--set", "scale_epochs=-1"],
                          "scale_epochs (--set scale_epochs=...) must be >= 0"),
                         (["--granularity", "channel", "--set", "scale_bn=true"],
                          "give scale_epochs (--set scale_epochs=...) N"),
                         (["--granularity", "channel", "--set", "joint_heads=-1"],
                          "joint_heads (--set joint_heads=...) is the weight"),
                         (["--granularity", "channel", "--set", "joint_heads=1", "--classes", "0,1"],
                          "2 of the model's"),
                         (["--granularity", "channel", "--recipe", "tiny"], "unknown recipe 'tiny'"),
                         (["--granularity", "node", "--recipe", "cheap"], "add --granularity channel"),
                         (["--granularity", "channel", "--recipe", "small", "--max-loss", "1"],
                          "does not take --max-loss")):
        assert_user_error(*run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "x"), *args], capsys),
                          needle)
    assert not Path(tmp_path / "x").exists()


def test_onnx_export_of_node_and_slim_compositions(tmp_path, npz_data, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")  # the dev extra installs it; CI runs this test
    rc, _, err = run(["train", "--arch", "resnet20", "--arch-arg", "width=8", "--data", npz_data, "--epochs", "1",
                      "--out",
                      str(tmp_path / "m")], capsys)
    assert rc == 0, err
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "node")], capsys)
    assert rc == 0, err
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "slim"), "--granularity", "channel",
                      "--set", "samples=20", "--set", "scale_epochs=2"], capsys)  # learned scales, folded in
    assert rc == 0, err
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    for name in ("node", "slim"):
        file = tmp_path / f"{name}.onnx"
        rc, stdout, err = run(["export", str(tmp_path / name), "--onnx", str(file), "--json"], capsys)
        assert rc == 0, err
        result = json.loads(stdout)
        assert result["max_abs_difference"] <= 1e-4 and len(result["classes"]) == 3
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        with torch.no_grad():
            expected = cnnmod.compose(cnnmod.load_modules(tmp_path / name), "vote", "none")(images)
        assert torch.allclose(got, expected, atol=1e-4)
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(file)).metadata_props}
        assert json.loads(meta["classes"]) == result["classes"] and meta["cnnmod_version"] == cnnmod.__version__
        assert json.loads(meta["input"])["shape"] == ["batch", 1, 8, 8]
    # one module alone exports as a detector: its calibrated probability
    file = tmp_path / "one.onnx"
    rc, stdout, err = run(["export", str(tmp_path / "slim" / "modules" / "c01-band1"), "--onnx", str(file), "--json"],
                          capsys)
    assert rc == 0 and json.loads(stdout)["calibration"] == "platt", err
    one = cnnmod.load_module(tmp_path / "slim" / "modules" / "c01-band1")
    got = torch.from_numpy(onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
                           .run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got[:, 0], one.score(one.prepare(images), "platt"), atol=1e-4)
    # the in-distribution test exports too (a comparison and a sum, no searchsorted)
    for name in ("node", "slim"):
        file = tmp_path / f"{name}-ood.onnx"
        rc, stdout, err = run(["export", str(tmp_path / name), "--onnx", str(file), "--calibration", "platt-ood"],
                              capsys)
        assert rc == 0, err
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        with torch.no_grad():
            expected = cnnmod.compose(cnnmod.load_modules(tmp_path / name), calibration="platt-ood")(images)
            platt = cnnmod.compose(cnnmod.load_modules(tmp_path / name), calibration="platt")(images)
        assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(expected, platt)
    assert_user_error(*run(["export", str(tmp_path / "node"), "--onnx", str(tmp_path / "node.onnx")], capsys),
                      "--overwrite")


def test_export_without_the_onnx_extra_says_how_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert_user_error(*run(["export", str(tmp_path), "--onnx", str(tmp_path / "x.onnx")], capsys),
                      "pip install 'cnnmod[onnx]'")


def test_merged_slim_composition(tmp_path, npz_data, capsys):
    rc, _, err = run(["train", "--arch", "resnet20", "--arch-arg", "width=8", "--data", npz_data, "--epochs", "2",
                      "--out", str(tmp_path / "m")],
                     capsys)
    assert rc == 0, err
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "slim"), "--granularity", "channel",
                      "--size", "0.3", "--set", "samples=30"], capsys)
    assert rc == 0, err
    modules = cnnmod.load_modules(tmp_path / "slim")
    out = tmp_path / "merged"
    rc, stdout, err = run(["compose", str(tmp_path / "slim" / "modules" / "c00-band0"),
                           str(tmp_path / "slim" / "modules" / "c02-band2"), "--mode", "merged", "--out", str(out),
                           "--json"], capsys)
    assert rc == 0, err
    from cnnmod.slim.artifact import load_merged_slim

    merged, source = load_merged_slim(out)
    assert merged.concerned == [0, 2] and merged.qualified_names[1].endswith(":band2")
    for root, removed in merged.removed.items():  # the union of the two modules' kept channels
        kept_by_either = set(range(10_000)) - (set(modules[0].removed[root]) & set(modules[2].removed[root]))
        assert set(removed) == set(range(10_000)) - kept_by_either
    assert merged.params() < sum(p.numel() for p in source.net.parameters())
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    scores = merged(images)
    assert scores.shape == (5, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    rc, stdout, err = run(["evaluate", str(out), "--json", "--latency-batch", "4"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["mode"] == "merged" and r["cost"]["composition"]["flops_fraction"] < 1.0
    assert [c["class"] for c in r["per_class"]] == [0, 2]
    assert merged.settings["world"] == [0, 2]  # its heads were fitted on its own classes' inputs
    # pruned further for its two classes, to a size (without the default recoveries): smaller, no bigger than asked
    rc, stdout, err = run(["compose", str(tmp_path / "slim" / "modules" / "c00-band0"),
                           str(tmp_path / "slim" / "modules" / "c02-band2"), "--mode", "merged", "--size", "0.25",
                           "--set", "cost=flops", "--set", "reconstruct=false", "--set", "scale_epochs=0",
                           "--set", "scale_bn=false", "--out", str(tmp_path / "pruned"), "--json"], capsys)
    assert rc == 0, err
    pruned, _ = load_merged_slim(tmp_path / "pruned")
    assert pruned.params() <= 0.25 * sum(p.numel() for p in source.net.parameters()) < merged.params()
    for root, removed in merged.removed.items():  # it started from the union: what that closed stays closed
        assert set(removed) <= set(pruned.removed[root])
    assert pruned.settings["size"] == 0.25 and pruned.settings["cost"] == "flops"
    assert json.loads(stdout)["params_fraction"] == pruned.metrics["params_fraction"] <= 0.25
    # the same cut with its kept weights then refitted to the model's features, then a scale per kept channel and
    # BatchNorm's affine learned for its two classes: the same channels, other convolution and BatchNorm weights,
    # the scales folded into the weights (no parameter more), recorded and on its card
    rc, _, err = run(["compose", str(tmp_path / "slim" / "modules" / "c00-band0"),
                      str(tmp_path / "slim" / "modules" / "c02-band2"), "--mode", "merged", "--size", "0.25",
                      "--set", "cost=flops", "--set", "reconstruct=true", "--set", "scale_epochs=2",
                      "--set", "scale_bn=true", "--out",
                      str(tmp_path / "refitted")], capsys)
    assert rc == 0, err
    refitted, _ = load_merged_slim(tmp_path / "refitted")
    assert refitted.removed == pruned.removed and refitted.params() == pruned.params()
    assert refitted.settings["reconstruct"] is True and pruned.settings["reconstruct"] is False
    assert (refitted.settings["scale_epochs"], refitted.settings["scale_bn"]) == (2, True)
    assert (pruned.settings["scale_epochs"], pruned.settings["scale_bn"]) == (0, False)
    weights = [(k, v) for k, v in refitted.net.state_dict().items() if k.endswith("conv2.weight")]
    assert any(not torch.equal(v, pruned.net.state_dict()[k]) for k, v in weights)
    bn_weights = [(k, v) for k, v in refitted.net.state_dict().items() if k.endswith("bn1.weight")]
    assert bn_weights and any(not torch.allclose(v, pruned.net.state_dict()[k]) for k, v in bn_weights)
    card = (tmp_path / "refitted" / "README.md").read_text()
    assert "by least squares" in card and "learned after pruning, 2 epochs" in card
    # pruned as far as the held-out top-1 among its classes allows: with no loss allowed against the model
    # restricted to them, it loses none, and the saved network and the model score what was recorded on the
    # held-out inputs (the model's validation images, in each class's seeded order); with any loss allowed, down
    # to the floor
    pair = [str(tmp_path / "slim" / "modules" / "c00-band0"), str(tmp_path / "slim" / "modules" / "c02-band2")]
    rc, stdout, err = run(["compose", *pair, "--mode", "merged", "--max-loss", "0", "--size", "0.3", "--out",
                           str(tmp_path / "careful"), "--json"], capsys)
    assert rc == 0, err
    careful, careful_source = load_merged_slim(tmp_path / "careful")
    # no step loses: it ends no worse than the model, or, when the union already was, as the union
    assert careful.metrics["held_out_top1"] >= careful.metrics["held_out_model_top1"] or (
        careful.removed == merged.removed and careful.metrics["history"] == [careful.metrics["history"][0]])
    assert json.loads(stdout)["held_out_top1"] == careful.metrics["held_out_top1"]
    train = cnnmod.data.load(npz_data, "train")
    order = class_order(train.labels, train.num_classes, careful.settings["seed"])
    _, validation = split_train_val(train, 0.1, None, 0)  # as `train` split it: the images it never trained on
    never_trained = {bytes(x.numpy()) for x in validation.images}
    held = torch.cat([torch.tensor([i for i in order[c] if bytes(train.images[i].numpy()) in never_trained])
                      for c in (0, 2)])
    assert careful.metrics["held_out_from"] == "validation"
    assert len(held) == careful.metrics["held_out_images"] > 0
    right = torch.tensor([0, 2])[careful.predict(train.images[held])] == train.labels[held]
    assert 100.0 * float(right.float().mean()) == pytest.approx(careful.metrics["held_out_top1"], abs=1e-6)
    with torch.no_grad():
        model_right = torch.tensor([0, 2])[careful_source(careful_source.prepare(train.images[held]))[:, [0, 2]]
                                           .argmax(1)] == train.labels[held]
    assert 100.0 * float(model_right.float().mean()) == pytest.approx(careful.metrics["held_out_model_top1"],
                                                                      abs=1e-6)
    rc, _, err = run(["compose", *pair, "--mode", "merged", "--max-loss", "100", "--size", "0.2",
                      "--set", "rule=fisher",
                      "--out", str(tmp_path / "reckless")], capsys)
    assert rc == 0, err
    reckless, _ = load_merged_slim(tmp_path / "reckless")
    assert reckless.metrics["params_fraction"] <= 0.2  # down to the floor
    assert reckless.settings["max_loss"] == 100
    assert reckless.settings["rule"] == pruned.settings["rule"] == "fisher"  # the default for merged pruning
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "vote", "--max-loss", "1", "--out",
                            str(tmp_path / "x")],
                           capsys), "--max-loss prunes a merged slim composition")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "vote", "--size", "0.5", "--out",
                            str(tmp_path / "x")], capsys), "--size prunes a merged slim composition")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--set", "cost=flops", "--out",
                            str(tmp_path / "x")], capsys),
                      "cost (--set cost=...) shapes how --size prunes", "give --size too")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--set", "reconstruct=true", "--out",
                            str(tmp_path / "x")], capsys),
                      "reconstruct (--set reconstruct=...) shapes how --size prunes")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--set", "rule=fisher", "--out",
                            str(tmp_path / "x")], capsys), "rule (--set rule=...) shapes how --size prunes")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--set", "scale_epochs=2", "--out",
                            str(tmp_path / "x")], capsys),
                      "scale_epochs (--set scale_epochs=...) shapes how --size prunes")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--size", "0.2",
                            "--set", "scale_epochs=0", "--set", "scale_bn=true",
                            "--out", str(tmp_path / "x")], capsys), "scale_bn (--set scale_bn=...) learns")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--size", "0.2",
                            "--set", "rule=best",
                            "--out", str(tmp_path / "x")], capsys), "unknown importance rule 'best'")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--mode", "merged", "--size", "2", "--out",
                            str(tmp_path / "x")], capsys), "--size")
    # a merged network is one network: it cannot be taken apart into modules
    assert_user_error(*run(["compose", str(out), "--out", str(tmp_path / "x")], capsys), "merged slim composition")
    assert_user_error(*run(["compose", str(tmp_path / "slim"), str(tmp_path / "slim"),
                            "--mode", "fused", "--out", str(tmp_path / "x")], capsys), "two modules for class 0")
    # a slim module's head was fitted when it was made: no refitting, no relearning of its nodes
    assert_user_error(*run(["compose", str(tmp_path / "slim"), "--refit-heads", "--out", str(tmp_path / "x")],
                           capsys), "--refit-heads works on node-level modules")
    assert not (tmp_path / "x").exists()


def test_fused_slim_composition_of_two_models(tmp_path, npz_data, capsys):
    """Slim modules of two models of two data sets (horizontal bands, vertical bands): one merged network per
    model, each fitted against the other model's classes too, so that a class of one data set is not claimed by
    the other's network."""
    from conftest import synthetic_arrays

    from cnnmod.slim.artifact import load_fused_slim

    x_train, y_train = synthetic_arrays(40, 3, 8, seed=7)
    x_test, y_test = synthetic_arrays(10, 3, 8, seed=8)
    vertical = tmp_path / "vertical.npz"
    np.savez(vertical, x_train=x_train.transpose(0, 2, 1), y_train=y_train, x_test=x_test.transpose(0, 2, 1),
             y_test=y_test, class_names=np.array([f"column{c}" for c in range(3)]))
    for name, data in (("a", npz_data), ("b", f"npz:{vertical}")):
        rc, _, err = run(["train", "--arch", "cnn", "--data", data, "--epochs", "4", "--out", str(tmp_path / name)],
                         capsys)
        assert rc == 0, err
        rc, _, err = run(["decompose", str(tmp_path / name), "--out", str(tmp_path / f"{name}-slim"),
                          "--granularity", "channel", "--size", "0.5", "--set", "samples=30"], capsys)
        assert rc == 0, err
    picked = [str(tmp_path / "a-slim" / "modules" / "c00-band0"), str(tmp_path / "a-slim" / "modules" / "c02-band2"),
              str(tmp_path / "b-slim" / "modules" / "c01-column1")]
    assert_user_error(*run(["compose", *picked, "--mode", "merged", "--out", str(tmp_path / "m")], capsys),
                      "--mode fused")
    assert_user_error(*run(["compose", *picked, "--mode", "fused", "--size", "0.3", "--out", str(tmp_path / "m")],
                           capsys), "--size")
    rc, stdout, err = run(["compose", *picked, "--mode", "fused", "--out", str(tmp_path / "fused"), "--json"], capsys)
    assert rc == 0, err
    made = json.loads(stdout)
    assert made["parts"] == 2 and made["classes"][2].endswith("vertical.npz:column1")
    fused, sources = load_fused_slim(tmp_path / "fused")
    a, b = fused.parts
    assert a.concerned == [0, 2] and b.concerned == [1] and len(sources) == 2
    assert a.settings["foreign"] == [f"npz:{vertical}:1"] and b.settings["foreign"] == [f"{npz_data}:0,2"]
    modules = cnnmod.load_modules(tmp_path / "a-slim")
    for root, removed in a.removed.items():  # the union of the two modules' kept channels
        assert set(removed) == set(modules[0].removed[root]) & set(modules[2].removed[root])
    # each network claims its own classes and leaves the other data set's images alone
    with torch.no_grad():
        on_vertical = fused(torch.from_numpy(x_test.transpose(0, 2, 1)[y_test == 1].copy())[:, None])
        on_bands = fused(torch.from_numpy(x_test[np.isin(y_test, [0, 2])].copy())[:, None])
    assert float(on_vertical[:, :2].max(1).values.mean()) < 0.5 and float(on_bands[:, 2].mean()) < 0.5
    assert float((on_vertical.argmax(1) == 2).float().mean()) >= 0.9
    assert float((on_bands.argmax(1) < 2).float().mean()) >= 0.9
    rc, stdout, err = run(["evaluate", str(tmp_path / "fused"), "--json", "--latency-batch", "4"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["mode"] == "fused" and r["test_images"] == 30 and r["composed_top1"] >= 90.0
    assert [c["name"] for c in r["per_class"]] == made["classes"]
    total = sum(sum(p.numel() for p in s.net.parameters()) for s in sources)
    assert r["cost"]["composition"]["params_fraction"] == pytest.approx(fused.params() / total, abs=1e-4)
    assert fused.params() < total
    assert r["cost"]["composition"]["model_params"] == total
    assert_user_error(*run(["evaluate", str(tmp_path / "fused"), "--data", npz_data], capsys), "--data")
    onnx = pytest.importorskip("onnx")
    assert onnx is not None
    rc, stdout, err = run(["export", str(tmp_path / "fused"), "--onnx", str(tmp_path / "fused.onnx"), "--json"],
                          capsys)
    assert rc == 0, err
    assert json.loads(stdout)["classes"] == made["classes"]


def test_a_size_out_of_reach_names_the_smallest_one():
    """Every group keeps one channel: the small CNN (1x12x12, 4 classes) then holds conv1 1x9+1, conv2 1x9+1,
    fc1 (1x3x3)+1 and the two-way head 2x1+2 = 34 of its 23,556 parameters: 0.00144, said as 0.0015."""
    clf = source("cnn")
    assert sum(p.numel() for p in clf.net.parameters()) == 160 + 4640 + 18496 + 260
    with pytest.raises(UserError, match=r"size 0.001 is out of reach for .*: every channel group keeps at least "
                                        r"one channel, so the smallest it reaches is 0.0015 of the parameters; ask "
                                        r"for size 0.0015 or more"):
        slim_module(clf, random_data(per_class=30), 2, SlimSettings(size=0.001, samples=40, step=0.5))


def test_a_max_loss_the_first_step_misses_says_what_it_loses(monkeypatch):
    scores = itertools.chain([100.0, 100.0], itertools.repeat(90.0))  # before pruning (measured, then as the
    # reference), then after every step: 10 points lost at once
    monkeypatch.setattr(Pruner, "top1", lambda self, *a, **k: next(scores))
    with pytest.raises(UserError, match=r"max_loss 1 pp cannot be met: the first pruning step \(to 0\.\d+ of the "
                                        r"parameters\) already loses 10.00 pp of held-out accuracy"):
        slim_module(source("cnn"), random_data(per_class=30), 2, SlimSettings(max_loss=1.0, samples=40, held_out=10,
                                                                              step=0.2))


def test_a_step_takes_the_least_important_channels_within_quotas_budget_and_caps():
    """``take`` by hand: two pruners, group costs 1 and 3 parameters per channel; a group keeps one channel."""
    from types import SimpleNamespace

    def fake(gates):
        return SimpleNamespace(gates=[torch.tensor(g) for g in gates], per_channel=[1.0, 3.0])

    a, b = fake([[1.0, 1.0, 1.0], [1.0, 1.0]]), fake([[1.0, 0.0, 1.0], [1.0, 1.0]])
    ranked = sorted([(0.1, 0, 0, 0), (0.2, 1, 0, 0), (0.3, 1, 0, 2), (0.4, 0, 1, 1), (0.5, 0, 1, 0),
                     (0.6, 0, 0, 2), (0.7, 1, 1, 0)])
    # in order: a.0.0 (1), b.0.0 (1), b.0.2 refused (b's group 0 would be empty), a.1.1 (3): 5 >= budget 5
    assert take(ranked, 5.0, [a, b]) == [(0, 0, 0), (1, 0, 0), (0, 1, 1)]
    # a capped at 1 parameter: a.1.1 and a.0.2 refused, then b.1.0 (3) spends the budget
    assert take(ranked, 5.0, [a, b], caps=[1.0, 10.0]) == [(0, 0, 0), (1, 0, 0), (1, 1, 0)]
    assert take(ranked, 0.0, [a, b]) == []


def test_a_total_budget_gives_the_channels_to_the_module_that_needs_them(monkeypatch):
    """With ``budget="total"`` the modules hold ``size`` on average, ranked on one scale: when every channel
    matters a million times more to class 0's module than to class 2's, class 2's module gives what the steps cut
    (up to twice ``step`` of its own per step) and class 0's keeps most of the network; with a budget per module
    both are cut to ``size``."""
    from cnnmod.slim.importance import IMPORTANCES

    clf, data = source("cnn"), random_data(per_class=20)
    class_zero = clf.prepare(data.images[data.labels == 0])

    class FavoursClassZero(Taylor):  # an importance plugged in by name, as a benchmark registers one
        name = "favours-class-0"

        def __call__(self, view):
            own = view.x[view.targets[:, 0].bool()][:1]
            weight = 1e6 if bool((own == class_zero).flatten(1).all(1).any()) else 1.0
            return [sc * weight for sc in super().__call__(view)]

    monkeypatch.setitem(IMPORTANCES, FavoursClassZero.name, FavoursClassZero)
    s = SlimSettings(size=0.5, samples=30, step=0.2, step_samples=24, budget="total", rule="favours-class-0")
    started = time.perf_counter()
    first, second = slim_modules(clf, data, [0, 2], s)
    wall = time.perf_counter() - started
    # each module's seconds: its own setup and its share of the joint pruning, so that they add up to the run
    assert first.settings["seconds"] + second.settings["seconds"] <= wall * 1.02 + 0.05
    f0, f2 = first.metrics["params_fraction"], second.metrics["params_fraction"]
    assert (f0 + f2) / 2 <= 0.5 and f0 > 0.7 and f2 < 0.3
    assert first.settings["budget"] == "total"
    x = torch.randn(5, 1, 12, 12)
    for m in (first, second):  # what each computes is its own gated network's (verified when sliced), a valid module
        assert m(x).shape == (5, 2)
    each = slim_modules(clf, data, [0, 2], replace(s, budget="module"))
    assert all(m.metrics["params_fraction"] <= 0.5 for m in each)
    assert abs(each[0].metrics["params_fraction"] - each[1].metrics["params_fraction"]) < 0.1


def test_a_total_budget_takes_no_max_loss():
    # in the library's words, and in the command line's (the flags it has for those settings)
    with pytest.raises(UserError, match="budget total shares size among the modules; it does not take max_loss") as e:
        SlimSettings(max_loss=1.0, budget="total").check()
    assert e.value.for_command_line({"budget": "--slim-budget"}).startswith(
        "--slim-budget total shares --size among the modules; it does not take --max-loss")
    with pytest.raises(UserError, match="unknown slim budget 'all'; use module or total"):
        SlimSettings(budget="all").check()


def _block_classes(n_per_class: int, seed: int):
    """4 classes of 12x12 images: noise in [0, 60) everywhere, and class c's three rows 3c..3c+2 brighter by
    150; and an MLP (144-16-12-4) built by hand to read them: hidden unit c < 4 is the mean of class c's rows
    (active only when they are bright), second-layer unit c copies it, logit c = 4 * that - 2; the other 12 + 8
    hidden units are active on every input and carry nothing of the class (small random weights)."""
    from cnnmod.data.dataset import ImageSet

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4 * n_per_class) % 4
    images = torch.randint(0, 60, (labels.numel(), 1, 12, 12), generator=g)
    for c in range(4):
        images[labels == c, :, 3 * c:3 * c + 3, :] += 150
    data = ImageSet("blocks", "train", images.to(torch.uint8), labels, [f"b{c}" for c in range(4)], (0.5,), (0.25,))
    net = build("mlp", (1, 12, 12), 4, hidden=[16, 12]).eval()
    first, second, head = net.features[1], net.features[3], net.classifier
    with torch.no_grad():
        first.weight.normal_(0, 0.02, generator=g)
        first.bias.fill_(1.0)
        second.weight.zero_()
        second.weight[4:, 4:].normal_(0, 0.1, generator=g)
        second.bias.fill_(1.0)
        head.weight.zero_()
        head.bias.fill_(-2.0)
        for c in range(4):
            first.weight[c] = 0.0
            first.weight[c].view(12, 12)[3 * c:3 * c + 3, :] = 1 / 36
            first.bias[c] = 0.35
            second.weight[c, c], second.bias[c] = 1.0, 0.0
            head.weight[c, c] = 4.0
    return data, Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"b{c}" for c in range(4)], "mlp",
                            {"hidden": [16, 12]}, "blocks")


@pytest.mark.parametrize("rule", ["taylor", "fisher"])
def test_a_small_module_keeps_the_units_that_carry_its_class(rule):
    """At 15% of the hand-built MLP's parameters (about two of the 16 first-layer units), class 1's module keeps
    first- and second-layer unit 1 (the only ones that see class 1's rows) and tells class 1 from the others on
    new images as the model does, without error."""
    data, clf = _block_classes(60, 0)
    test, _ = _block_classes(40, 1)
    with torch.no_grad():
        assert bool((clf.net(clf.prepare(test.images)).argmax(1) == test.labels).all())  # the model is right
    m = slim_module(clf, data, 1, SlimSettings(size=0.15, samples=60, step=0.2, rule=rule))
    assert m.metrics["params_fraction"] <= 0.15
    assert 1 not in m.removed["features.1"] and 1 not in m.removed["features.3"]
    with torch.no_grad():
        mine = m(clf.prepare(test.images)).argmax(1) == 0
    assert bool((mine == (test.labels == 1)).all())


def test_learned_channel_scales_are_folded_into_the_slim_module():
    """With --scale-epochs the kept channels' gates end as learned scales (not all 0 or 1): the slim module,
    with them folded into its weights, computes what the gated network computes on new inputs, and costs no
    parameter more than the module cut the same way without them."""
    clf = source("resnet20", width=8)
    data = random_data(per_class=20)
    s = SlimSettings(size=0.4, samples=40, step=0.2, step_samples=16)
    plain = slim_module(clf, data, 1, s)
    m, (net, graph, groups, gates, hw, hb) = slim_with_reference(clf, data, 1, replace(s, scale_epochs=3))
    assert any(bool(((g > 0) & (g != 1)).any()) for g in gates)
    assert m.removed == plain.removed and m.params() == plain.params()
    x = torch.randn(9, 1, 12, 12)
    with torch.no_grad(), gated(net, graph, groups, gates):
        expected = classifier_input(net, graph.head, lambda: net(x)) @ hw.T + hb
    with torch.no_grad():
        assert torch.allclose(m(x), expected, atol=1e-4)
        assert not torch.allclose(plain(x), expected, atol=1e-3)


def test_learned_batchnorm_affine_stays_in_the_module_and_is_exact():
    """With --scale-bn the BatchNorm layers' scales and shifts are learned with the channel scales: the module's
    BatchNorm weights differ from the model's on its kept channels, the model itself is untouched (each module
    learns on its own copy), the module computes what its gated network computes, and it holds exactly the
    parameters of the module cut the same way without them. On held-out inputs, a fall in accuracy undoes them."""
    clf = source("resnet20", width=8)
    original = {k: v.clone() for k, v in clf.net.state_dict().items()}
    data = random_data(per_class=20)
    s = SlimSettings(size=0.4, samples=40, step=0.2, step_samples=16, scale_epochs=3)
    plain = slim_module(clf, data, 1, s)
    m, (net, graph, groups, gates, hw, hb) = slim_with_reference(clf, data, 1, replace(s, scale_bn=True))
    assert all(torch.equal(v, original[k]) for k, v in clf.net.state_dict().items())
    assert m.removed == plain.removed and m.params() == plain.params()
    # the kept channels' BatchNorm scales were learned: they are no longer the model's values (on whichever
    # channels the module kept; a narrowed network holds only those)
    assert not bool(torch.isin(net.get_submodule("bn1").weight, original["bn1.weight"]).all())
    x = torch.randn(9, 1, 12, 12)
    with torch.no_grad(), gated(net, graph, groups, gates):
        expected = classifier_input(net, graph.head, lambda: net(x)) @ hw.T + hb
    with torch.no_grad():
        assert torch.allclose(m(x), expected, atol=1e-4)
    features = ModelGraph(clf.net, clf.spec.shape).head.linear_map(clf.net)[0].shape[1]
    pruner = Pruner(clf, replace(s, scale_bn=True).resolved(0.4),
                    Margins(clf.prepare(data.images[:40]), (data.labels[:40] == 1)[:, None], None,
                            torch.randn(1, features, generator=torch.Generator().manual_seed(0)), torch.zeros(1)))
    bn = {k: v.clone() for k, v in pruner.net.state_dict().items() if k.endswith((".weight", ".bias"))}
    calls = iter([90.0, 80.0])  # held-out accuracy before, then with them: undone, BatchNorm's weights too
    Scales(3, bn=True)(pruner, lambda: next(calls))
    assert all(torch.equal(pruner.net.state_dict()[k], v) for k, v in bn.items())


def test_learned_scales_that_lose_held_out_accuracy_are_not_kept():
    """With held-out inputs (--max-loss), learned scales that lower the held-out accuracy are undone: the gates
    go back to what the last step left."""
    clf = source("resnet20", width=8)
    data = random_data(per_class=20)
    features = ModelGraph(clf.net, clf.spec.shape).head.linear_map(clf.net)[0].shape[1]
    pruner = Pruner(clf, SlimSettings(size=0.4, samples=40, step_samples=16, scale_epochs=2).resolved(0.4),
                    Margins(clf.prepare(data.images[:40]), (data.labels[:40] == 1)[:, None], None,
                            torch.randn(1, features, generator=torch.Generator().manual_seed(0)), torch.zeros(1)))
    before = [g.clone() for g in pruner.gates]
    calls = iter([90.0, 80.0])  # held-out accuracy before the scales, then with them
    Scales(2)(pruner, lambda: next(calls))
    assert all(torch.equal(g, b) for g, b in zip(pruner.gates, before, strict=True))
    calls = iter([80.0, 80.0])  # no loss: kept
    Scales(2)(pruner, lambda: next(calls))
    assert any(bool(((g > 0) & (g != 1)).any()) for g in pruner.gates)


def _joint_case():
    """Slim modules of every class of a random ResNet-20 (4 classes) made with their heads fitted alone (a copy
    each time: the tests refit them in place), and the observed inputs their heads are refitted together on."""
    clf, data, modules, index = _joint_made()
    return clf, data, copy.deepcopy(modules), index


@functools.cache
def _joint_made():
    clf = source("resnet20", width=8)
    data = random_data(per_class=24)
    s = SlimSettings(size=0.5, samples=24, step=0.3, step_samples=None)
    modules = slim_modules(clf, data, [0, 1, 2, 3], s)
    index = Pools(clf, data, s.seed).first([0, 1, 2, 3], 12)
    return clf, data, modules, index


def _margins(modules):
    return [((m.head_weight[0] - m.head_weight[1]).detach().double(), float((m.head_bias[0] - m.head_bias[1]).detach()))
            for m in modules]


def test_heads_refitted_together_with_the_odds_already_known_fit_alike():
    """slim_modules hands the joint refit the source's log-odds it computed on every observed input: the refit
    then takes them instead of running the model again, and fits the same heads; odds known only on other inputs
    are not taken (the model runs as without them)."""
    from cnnmod.core.calibrate import model_log_odds
    from cnnmod.slim.make import refit_heads_together

    clf, data, modules, _ = _joint_case()
    s = SlimSettings(size=0.5, samples=24, joint_heads=3.0)
    union = torch.arange(len(data))
    known = union, model_log_odds(clf, data.images[union])
    fitted = []
    for given in (None, known, (union[:5], known[1][:5]), (union, known[1] + 10.0)):
        made = copy.deepcopy(modules)
        refit_heads_together(made, clf, data, s, known=given)
        fitted.append(torch.cat([torch.cat([w, torch.tensor([b])]) for w, b in _margins(made)]))
    assert torch.allclose(fitted[1], fitted[0], atol=1e-4)
    assert torch.allclose(fitted[2], fitted[0], atol=1e-4)  # not every input known: the model runs
    assert not torch.allclose(fitted[3], fitted[0], atol=1e-2)  # the odds given are the ones used


def test_heads_refitted_together_at_weight_zero_are_each_heads_own_fit():
    """At weight 0 the joint refit's loss is the sum of the modules' own binary losses: it separates, and each
    module's head reaches the minimum that fitting it alone (``fit_head``, the refit every slim module gets) on
    the same inputs, to the source's p_c on them, reaches (the loss is convex: one minimum value, though on a
    few inputs a flat valley of heads reaches it)."""
    from cnnmod.composition.joint import fit_heads_jointly, module_features
    from cnnmod.core.calibrate import balanced_bce

    clf, data, modules, index = _joint_case()
    images, labels = data.images[index], data.labels[index]
    features = module_features(modules, images)
    p = torch.sigmoid(source_log_odds(clf.net, clf.prepare(images))).double()

    def own(k, w, b):
        return float(balanced_bce(features[k] @ w.double() + b, labels == k, p[:, k]) + 1e-4 * (w.double() ** 2).sum())

    before = [own(k, w, b) for k, (w, b) in enumerate(_margins(modules))]
    fit_heads_jointly(modules, clf, data, index, weight=0.0)
    for k, (w, b) in enumerate(_margins(modules)):
        alone_w, alone_b = fit_head(features[k].float(), labels == k, torch.zeros(features[k].shape[1]), 0.0,
                                    soft=p[:, k])
        assert own(k, w, b) == pytest.approx(own(k, alone_w, alone_b), abs=1e-4)
        assert own(k, w, b) <= before[k] + 1e-9


def test_heads_refitted_together_minimise_the_joint_loss():
    """The joint loss (each module's class-balanced binary loss to p_c, plus the weight times the cross-entropy of
    the softmax over the margins against the softmax over the source's log-odds, plus the heads' L2) is convex
    in the heads: computed here from the features, its gradient vanishes at the joint refit, and its value there
    is below its value at the heads fitted alone on the same inputs (weight 0); refitting again moves nothing."""
    from cnnmod.composition.joint import fit_heads_jointly, module_features
    from cnnmod.core.calibrate import balanced_bce

    clf, data, modules, index = _joint_case()
    images, labels = data.images[index], data.labels[index]
    features = module_features(modules, images)
    odds = source_log_odds(clf.net, clf.prepare(images)).double()

    def loss(heads):
        z = torch.stack([f @ w + b for f, (w, b) in zip(features, heads, strict=True)], 1)
        binary = sum(balanced_bce(z[:, k], labels == k, torch.sigmoid(odds[:, k])) for k in range(4))
        joint = -(torch.softmax(odds, 1) * torch.log_softmax(z, 1)).sum(1).mean()
        return binary + 3.0 * joint + 1e-4 * sum((w * w).sum() for w, _ in heads)

    def value(heads):
        return float(loss([(w, torch.tensor(b, dtype=torch.float64)) for w, b in heads]))

    alone = copy.deepcopy(modules)
    fit_heads_jointly(alone, clf, data, index, weight=0.0)
    fit_heads_jointly(modules, clf, data, index, weight=3.0)
    together = _margins(modules)
    assert value(together) < value(_margins(alone)) - 1e-4
    live = [(w.clone().requires_grad_(True), torch.tensor(b, dtype=torch.float64, requires_grad=True))
            for w, b in together]
    grads = torch.autograd.grad(loss(live), [t for pair in live for t in pair])
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    fit_heads_jointly(modules, clf, data, index, weight=3.0)
    again = _margins(modules)
    assert all(torch.allclose(w, w2, atol=1e-4) for (w, _), (w2, _) in zip(together, again, strict=True))


def _doubled_unit_mlp():
    """A random MLP (144-16-12-4) whose first-layer unit 5 is unit 4 doubled (weights and bias: after the ReLU,
    h5 = 2 h4 on every input): with unit 5 closed, the second layer reads the same thing through weights
    w4 + 2 w5 on unit 4, which least squares should find."""
    net = build("mlp", (1, 12, 12), 4, hidden=[16, 12]).eval()
    first = net.features[1]
    with torch.no_grad():
        first.weight[5] = 2 * first.weight[4]
        first.bias[5] = 2 * first.bias[4]
    clf = Classifier(net, InputSpec(1, 12, 12, (0.5,), (0.25,)), [f"c{c}" for c in range(4)], "mlp",
                     {"hidden": [16, 12]}, "random")
    x = torch.randn(300, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    s = SlimSettings(size=0.5, reconstruct=True, step_samples=None).resolved(0.5)
    pruner = Pruner(clf, s, Margins(x, (torch.arange(300) % 4 == 1)[:, None], None,
                                    torch.randn(1, 12, generator=torch.Generator().manual_seed(2)), torch.zeros(1)))
    group = next(i for i, g in enumerate(pruner.groups.groups) if "features.1" in g.roots)
    pruner.gates[group][5] = 0.0
    pruner.narrow()  # as a pruning step's refresh does: the network sliced to its open channels
    return clf, pruner, x


def test_reconstruction_gives_a_closed_units_work_to_the_kept_unit_that_carries_it():
    """Closing the doubled unit of :func:`_doubled_unit_mlp` changes what the gated network computes; refitted by
    least squares, the second layer reads unit 4 through w4 + 2 w5 (worked out by hand) and the gated network
    computes the model's outputs again, on inputs it never saw; the first layer (nothing closed before it) and
    the source model keep their weights, and the head is not a layer it refits."""
    clf, pruner, x = _doubled_unit_mlp()
    original = {k: v.clone() for k, v in clf.net.state_dict().items()}
    new = torch.randn(50, 1, 12, 12, generator=torch.Generator().manual_seed(3))

    def gated_out():
        with torch.no_grad(), gated(pruner.net, pruner.graph, pruner.groups, pruner.gates):
            return pruner.net(new)

    with torch.no_grad():
        want = clf.net(new)
    before = float((gated_out() - want).abs().max())
    assert before > 0.05  # the closed unit mattered
    Reconstruct()(pruner)
    second = pruner.net.features[3].weight
    expected = original["features.3.weight"][:, 4] + 2 * original["features.3.weight"][:, 5]
    assert torch.allclose(second[:, 4], expected, atol=1e-3)
    assert second.shape[1] == 15  # the network was narrowed: unit 5 is gone (unit 4 keeps its place)
    kept = torch.arange(16) != 5
    assert torch.allclose(pruner.net.features[1].weight, original["features.1.weight"][kept], atol=1e-5)
    assert torch.equal(pruner.net.classifier.weight, original["classifier.weight"])
    assert float((gated_out() - want).abs().max()) < before / 100
    assert all(torch.equal(v, original[k]) for k, v in clf.net.state_dict().items())


def test_reconstruction_that_loses_held_out_accuracy_is_undone():
    clf, pruner, _ = _doubled_unit_mlp()
    before = {k: v.clone() for k, v in pruner.net.state_dict().items()}
    calls = iter([90.0, 80.0])  # held-out accuracy before, then after: undone
    Reconstruct()(pruner, lambda: next(calls))
    assert all(torch.equal(pruner.net.state_dict()[k], v) for k, v in before.items())
    calls = iter([80.0, 80.0])  # no loss: kept
    Reconstruct()(pruner, lambda: next(calls))
    assert not torch.equal(pruner.net.features[3].weight, before["features.3.weight"])


def test_reconstruction_in_one_pass_refits_as_a_pass_per_layer(monkeypatch):
    """The refit runs as one forward pass over all its inputs when they fit (each layer refitted as the pass
    reaches it) and otherwise as one pass per layer and batch: on a ResNet-20 with channels closed in every group,
    the two give every layer the same weights (up to float rounding), and most differ from the weights before;
    BatchNorm keeps the model's statistics (the refit computed every layer under them) unless scales are learned
    after it."""
    from cnnmod.slim import refit as rec

    clf = source("resnet20")
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    s = SlimSettings(size=0.5, reconstruct=True, step_samples=None).resolved(0.5)
    weights = []
    for one_pass in (2 ** 40, 0):
        monkeypatch.setattr(rec, "ONE_PASS_BYTES", one_pass)
        pruner = Pruner(clf, s, Margins(x, (torch.arange(96) % 4 == 1)[:, None], None, torch.randn(1, 64),
                                        torch.zeros(1)), batch_size=32)
        for gate in pruner.gates:
            gate[torch.randperm(gate.numel(), generator=torch.Generator().manual_seed(gate.numel()))[
                :gate.numel() // 3]] = 0.0
        pruner.narrow()
        before = {k: v.clone() for k, v in pruner.net.state_dict().items() if k.endswith("weight")}
        Reconstruct()(pruner)
        weights.append({k: v.clone() for k, v in pruner.net.state_dict().items() if k.endswith("weight")})
        # every layer was refitted under the model's BatchNorm statistics (of the channels it kept), and they stay
        theirs, kept = clf.net.state_dict(), pruner.kept_outputs()
        assert all(torch.equal(v, theirs[k][kept[k.rpartition(".")[0]]]) for k, v in pruner.net.state_dict().items()
                   if "running_" in k)
    conv = [k for k in before if k.endswith("conv2.weight") or k.endswith("conv1.weight")]
    assert len(conv) >= 18
    for k in conv:  # float rounding apart (sums in another order, growing layer after layer: 2e-6 to 3e-4)
        assert float((weights[0][k] - weights[1][k]).abs().max()) <= 1e-3 * float(weights[0][k].abs().max()), k
    assert sum(not torch.allclose(weights[0][k], before[k], atol=1e-3) for k in conv) >= len(conv) // 2
    # with scales to learn after it, the statistics are re-estimated on the observed inputs first
    pruner = Pruner(clf, replace(s, scale_epochs=1),
                    Margins(x, (torch.arange(96) % 4 == 1)[:, None], None, torch.randn(1, 64), torch.zeros(1)),
                    batch_size=32)
    pruner.gates[0][:5] = 0.0
    Reconstruct()(pruner)
    theirs, kept = clf.net.state_dict(), pruner.kept_outputs()
    assert not any(torch.equal(v, theirs[k][kept.get(k.rpartition(".")[0], slice(None))])
                   for k, v in pruner.net.state_dict().items() if "running_mean" in k)


def test_reconstructed_slim_module_is_cut_alike_exact_and_nearer_the_model():
    """A slim module of a ResNet-20 (BatchNorm) made with --reconstruct is cut as the module made without it (the
    refit follows the last step) and holds as many parameters; it computes what its gated network computes; the
    model is untouched; and on new inputs its features (the head's input) are nearer the model's than those of
    the module made without it."""
    clf = source("resnet20", width=8)
    original = {k: v.clone() for k, v in clf.net.state_dict().items()}
    data = random_data(per_class=20)
    s = SlimSettings(size=0.4, samples=40, step=0.2, step_samples=16)
    plain, plain_reference = slim_with_reference(clf, data, 1, s)
    m, reference = slim_with_reference(clf, data, 1, replace(s, reconstruct=True))
    assert all(torch.equal(v, original[k]) for k, v in clf.net.state_dict().items())
    assert m.removed == plain.removed and m.params() == plain.params()
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    graph, _, full = frozen_copy(clf.net, clf.spec.shape)
    with torch.no_grad():
        want = classifier_input(clf.net, graph.head, lambda: clf.net(x))
    gaps = []
    for made, (net, graph_, groups, gates, hw, hb) in ((plain, plain_reference), (m, reference)):
        with torch.no_grad(), gated(net, graph_, groups, gates):
            f = classifier_input(net, graph_.head, lambda net=net: net(x))
        with torch.no_grad():
            assert torch.allclose(made(x), f @ hw.T + hb, atol=1e-4)
        kept = torch.ones(want.shape[1], dtype=torch.bool)  # the model's features the module still reads
        for group in full.groups:
            closed = torch.tensor(made.removed.get(group.root, []), dtype=torch.long)
            for layer, index, root in group.consumers:
                if layer == graph.head.layer:
                    kept[index[torch.isin(root, closed)]] = False
        assert f.shape[1] == int(kept.sum())  # the narrowed network computes those and no other
        gaps.append(float((f - want[:, kept]).pow(2).mean()))
    assert gaps[1] < gaps[0]
