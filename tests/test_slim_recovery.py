"""What slim pruning learns after its last step: channel scales, BatchNorm's affine, heads refitted together, and
least-squares reconstruction; each exact, undone where it loses held-out accuracy."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch
from conftest import random_data, slim_with_reference, source

from cnnmod.core.calibrate import fit_head, source_log_odds
from cnnmod.core.graph import ModelGraph
from cnnmod.data.transforms import InputSpec
from cnnmod.models import build
from cnnmod.models.classifier import Classifier
from cnnmod.slim import SlimSettings, slim_module, slim_modules
from cnnmod.slim.channels import classifier_input, frozen_copy, gated
from cnnmod.slim.make import InputPools
from cnnmod.slim.pruner import Margins, Pruner
from cnnmod.slim.recovery import Reconstruct, Scales


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
    index = InputPools(clf, data, s.seed).first([0, 1, 2, 3], 12)
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
