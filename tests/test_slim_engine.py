"""The slim engine: channel groups, gates, importances, the schedule and the pruner's state; the sliced network
computes exactly what the gated model computes."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch
from conftest import random_data, slim_with_reference, source

from cnnmod.core.calibrate import fit_head, source_log_odds
from cnnmod.core.observe import class_order
from cnnmod.data.dataset import split_train_val
from cnnmod.data.transforms import InputSpec
from cnnmod.errors import UserError
from cnnmod.models import build
from cnnmod.models.classifier import Classifier
from cnnmod.slim import ModuleMaker, SlimSettings, slim_module, slim_modules
from cnnmod.slim.channels import classifier_input, cost_per_channel, frozen_copy, gated, reestimate_bn
from cnnmod.slim.importance import Fisher, Taylor
from cnnmod.slim.make import InputPools, source_margin
from cnnmod.slim.pruner import Margins, Pruner, step_rows
from cnnmod.slim.recovery import FinalRefit, Reconstruct, Scales
from cnnmod.slim.schedule import candidates, channels_within_budget, close_channels, close_step, prune, step_share


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
        budget = step_share(s, a.fraction()) * a.total_params
        chosen = channels_within_budget([(v, 0, i, j) for v, i, j in ranked], budget, [a])
        close_channels(a, [(i, j) for _, i, j in chosen], ranked)
        close_channels(b, [(i, int(a.origin[i][j])) for _, i, j in chosen], [])  # the same channels, in the full net
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
    held = InputPools(clf, data, 0).held_out(list(range(4)), 10)
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
    pools = InputPools(clf, data, seed=3)
    order = class_order(data.labels, data.num_classes, 3)
    assert pools.held_out_from == "training"
    assert pools.held_out([1], 5).tolist() == order[1][-5:].flip(0).tolist()
    assert pools.observation(2, 8).tolist() == torch.cat([order[2][:8]] + [order[c][:2] for c in (0, 1, 3)]).tolist()
    clf.info["training"] = {"data": "rand", "val_split": 0.25, "seed": 7, "subset": None}
    pools = InputPools(clf, data, seed=3)
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
    assert InputPools(clf, data.subset([0, 1, 2]), 3).held_out_from == "training"
    clf.info["training"]["data"] = "other"
    assert InputPools(clf, data, 3).held_out_from == "training"


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


def test_a_size_out_of_reach_names_the_smallest_one():
    """Every group keeps one channel: the small CNN (1x12x12, 4 classes) then holds conv1 1x9+1, conv2 1x9+1,
    fc1 (1x3x3)+1 and the two-way head 2x1+2 = 34 of its 23,556 parameters: 0.00144, said as 0.0015."""
    clf = source("cnn")
    assert sum(p.numel() for p in clf.net.parameters()) == 160 + 4640 + 18496 + 260
    with pytest.raises(UserError, match=r"size 0.001 is out of reach for .*: every channel group keeps at least "
                                        r"one channel, so the smallest it reaches is 0.0015 of the parameters; ask "
                                        r"for size 0.0015 or more"):
        slim_module(clf, random_data(per_class=30), 2, SlimSettings(size=0.001, samples=40, step=0.5))


def test_a_max_loss_the_first_step_misses_says_what_it_loses():
    """The schedule's loss bound, given an accuracy that is a function of the pruner's state: 100 % with every
    channel open, 10 points less once any closes. The first step already loses more than ``max_loss``: refused,
    naming the share that step reached and what it lost."""
    s = SlimSettings(size=0.01, max_loss=1.0, samples=40, step=0.2).resolved(0.5)
    p = ModuleMaker(source("cnn"), random_data(per_class=30), 2, s).pruner
    every = p.kept_channels()
    with pytest.raises(UserError, match=r"max_loss 1 pp cannot be met: the first pruning step \(to 0\.\d+ of the "
                                        r"parameters\) already loses 10.00 pp of held-out accuracy"):
        prune(p, lambda: 100.0 if p.kept_channels() == every else 90.0)
    assert p.kept_channels() < every  # it stopped after that step


def test_a_step_takes_the_least_important_channels_within_quotas_budget_and_caps():
    """``take`` by hand: two pruners, group costs 1 and 3 parameters per channel; a group keeps one channel."""
    from types import SimpleNamespace

    def fake(gates):
        return SimpleNamespace(gates=[torch.tensor(g) for g in gates], per_channel=[1.0, 3.0])

    a, b = fake([[1.0, 1.0, 1.0], [1.0, 1.0]]), fake([[1.0, 0.0, 1.0], [1.0, 1.0]])
    ranked = sorted([(0.1, 0, 0, 0), (0.2, 1, 0, 0), (0.3, 1, 0, 2), (0.4, 0, 1, 1), (0.5, 0, 1, 0),
                     (0.6, 0, 0, 2), (0.7, 1, 1, 0)])
    # in order: a.0.0 (1), b.0.0 (1), b.0.2 refused (b's group 0 would be empty), a.1.1 (3): 5 >= budget 5
    assert channels_within_budget(ranked, 5.0, [a, b]) == [(0, 0, 0), (1, 0, 0), (0, 1, 1)]
    # a capped at 1 parameter: a.1.1 and a.0.2 refused, then b.1.0 (3) spends the budget
    assert channels_within_budget(ranked, 5.0, [a, b], caps=[1.0, 10.0]) == [(0, 0, 0), (1, 0, 0), (1, 1, 0)]
    assert channels_within_budget(ranked, 0.0, [a, b]) == []


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
