"""Reuse, replace, remove across models and data sets; continuous learning; joined data; energy records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run, write_npz

import cnnmod
from cnnmod.core.graph import ModelGraph
from cnnmod.core.observe import class_order, hooks
from cnnmod.energy import PAPER_KG_PER_KWH, PAPER_PUE, EnergyMeter, carbon_intensities
from cnnmod.errors import UserError


def train_and_decompose(tmp_path: Path, name: str, data: str, capsys, variant: str = "mc") -> Path:
    rc, _, err = run(["train", "--arch", "cnn", "--data", data, "--epochs", "3", "--batch-size", "16",
                      "--optimizer", "adam", "--lr", "0.01", "--out", str(tmp_path / name)], capsys)
    assert rc == 0, err
    rc, _, err = run(["decompose", str(tmp_path / name), "--out", str(tmp_path / f"{name}-dec"), "--variant",
                      variant], capsys)
    assert rc == 0, err
    return tmp_path / f"{name}-dec"


@pytest.fixture
def two_models(tmp_path: Path, capsys) -> tuple[Path, Path, str, str]:
    """Decompositions of two models of two data sets of one input shape (8x8 grey, 3 and 2 classes)."""
    a = f"npz:{write_npz(tmp_path / 'a.npz', classes=3, seed=0)}"
    b = f"npz:{write_npz(tmp_path / 'b.npz', n_per_class=30, classes=2, seed=7)}"
    return train_and_decompose(tmp_path, "ma", a, capsys), train_and_decompose(tmp_path, "mb", b, capsys), a, b


def test_compose_across_models_evaluates_on_each_class_own_data(two_models, tmp_path, capsys):
    dec_a, dec_b, a, b = two_models
    out = tmp_path / "comp"
    rc, stdout, err = run(["compose", str(dec_a / "modules" / "c00-band0"), str(dec_a / "modules" / "c02-band2"),
                           str(dec_b / "modules" / "c01-band1"), "--out", str(out), "--json"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["classes"] == [f"{a}:band0", f"{a}:band2", f"{b}:band1"] and len(result["sources"]) == 2
    assert result["energy"]["composition"]["tracker"] == "estimator"
    rc, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    # independently: each module scores the images of its own class's test set; the highest score wins
    modules = cnnmod.load_modules(out)
    test_a, test_b = cnnmod.data.load(a, "test", classes=[0, 2]), cnnmod.data.load(b, "test", classes=[1])
    images = torch.cat([test_a.images, test_b.images])
    labels = torch.cat([test_a.labels, test_b.labels + 2])
    with torch.no_grad():
        scores = torch.stack([m.score(m.prepare(images)) for m in modules], 1)
    expected = 100.0 * float((scores.argmax(1) == labels).float().mean())
    assert r["composed_top1"] == pytest.approx(expected, abs=1e-3)
    assert [c["count"] for c in r["per_class"]] == [int((labels == i).sum()) for i in range(3)]
    assert "model_top1" not in r  # no single model to compare with
    # the two models' normalisations differ, and each module used its own
    assert modules[0].source.spec.mean != modules[2].source.spec.mean


def test_replace_and_remove(two_models, tmp_path, capsys):
    dec_a, dec_b, a, b = two_models
    out = tmp_path / "replaced"
    rc, stdout, err = run(["replace", str(dec_a), "--class", "band1", "--with", str(dec_b / "modules" / "c00-band0"),
                           "--out", str(out), "--json"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["replaced"] == f"{a}:band1" and r["with"] == f"{b}:band0"
    assert r["classes"] == [f"{a}:band0", f"{b}:band0", f"{a}:band2"]
    # a module of another data set came in: its scores are compared calibrated, as for a composition of such
    assert (r["mode"], r["calibration"]) == ("vote", "platt-ood")
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    new = cnnmod.load_module(dec_b / "modules" / "c00-band0")
    comp = cnnmod.compose(cnnmod.load_modules(out), calibration="none")
    assert torch.allclose(comp(images)[:, 1], new.score(new.prepare(images)), atol=1e-6)

    rc, stdout, err = run(["remove", str(out), "--class", f"{a}:2", "--out", str(tmp_path / "removed"), "--json"],
                          capsys)
    assert rc == 0, err
    assert json.loads(stdout)["classes"] == [f"{a}:band0", f"{b}:band0"]
    config = json.loads((tmp_path / "removed" / "config.json").read_text())
    assert config["kind"] == "composition" and config["removed"] == f"{a}:band2"
    # bad input: unknown class, a class the composition does not have, a folder of many modules as --with
    assert_user_error(*run(["remove", str(out), "--class", "nope", "--out", str(tmp_path / "x")], capsys),
                      "no class 'nope'", "band0")
    assert_user_error(*run(["replace", str(out), "--class", "band0", "--with", str(dec_b), "--out",
                            str(tmp_path / "x")], capsys), "matches 2 modules")
    assert_user_error(*run(["replace", str(out), "--class", f"{a}:band0", "--with", str(dec_b), "--out",
                            str(tmp_path / "x")], capsys), "must be one module folder")
    assert_user_error(*run(["replace", str(dec_a), "--class", "band0", "--with",
                            str(dec_a / "modules" / "c02-band2"), "--out", str(tmp_path / "x")], capsys),
                      "already")
    assert not (tmp_path / "x").exists()


def test_compose_refuses_other_shapes_and_duplicates(two_models, tmp_path, capsys):
    dec_a, _, _, _ = two_models
    c = f"npz:{write_npz(tmp_path / 'c.npz', classes=2, size=10, seed=3)}"
    dec_c = train_and_decompose(tmp_path, "mc", c, capsys)
    assert_user_error(*run(["compose", str(dec_a), str(dec_c), "--out", str(tmp_path / "x")], capsys),
                      "input shapes", "1x10x10", "1x8x8")
    assert_user_error(*run(["compose", str(dec_a), str(dec_a / "modules" / "c01-band1"), "--out",
                            str(tmp_path / "x")], capsys), "two modules for class 1")
    assert_user_error(*run(["compose", str(dec_a), "--out", str(tmp_path / "x"), "--continuous-learning"], capsys),
                      "at least two data sets")
    assert not (tmp_path / "x").exists()


def test_continuous_learning_keeps_nodes_active_for_foreign_inputs(two_models, tmp_path, capsys):
    dec_a, dec_b, a, b = two_models
    out = tmp_path / "cl"
    rc, _, err = run(["compose", str(dec_a), str(dec_b / "modules" / "c01-band1"), "--out", str(out),
                      "--continuous-learning"], capsys)
    assert rc == 0, err
    before, after = cnnmod.load_modules(dec_a), cnnmod.load_modules(out)[:3]
    foreign = cnnmod.data.load(b, "train", classes=[1])
    for m0, m1 in zip(before, after, strict=True):
        k = max(1, m0.settings["observed"] // 2)  # TI's budget: N_concerned / (n - 1), n = 3
        first = class_order(foreign.labels, 1, m0.settings["seed"])[0][:k]
        net, graph = m0.source.net, ModelGraph(m0.source.net, (1, 8, 8))
        seen: dict[str, torch.Tensor] = {}
        with hooks(net, graph.points, lambda p, o, seen=seen: seen.__setitem__(p.name, (o > 0).any(0))), \
                torch.no_grad():
            net(m0.prepare(foreign.images[first]))
        for name in m0.masks:  # variant mc: exactly the old keep set plus what the foreign inputs activated
            assert torch.equal(m1.masks[name], m0.masks[name] | seen[name]), name
        assert m1.settings["continuous_learning"][0]["per_class"] == k
    # the foreign module relearned the first model's classes
    relearned = cnnmod.load_modules(out)
    assert [e["data"] for e in relearned[3].settings["continuous_learning"]] == [a]
    # every calibration was refitted on the composition's classes of both data sets: on those held-out inputs
    # its Platt loss is the optimum, no worse than the calibration fitted on the module's own data set alone
    from cnnmod.composition.fitting import calibration_set
    from cnnmod.core.calibrate import balanced_bce

    made = cnnmod.load_modules(dec_a) + [cnnmod.load_module(dec_b / "modules" / "c01-band1")]
    held = {a: calibration_set(cnnmod.data.load(a, "train"), 100, 0),
            b: calibration_set(cnnmod.data.load(b, "train", classes=[1]), 100, 0)}
    for m, m0 in zip(relearned, made, strict=True):
        assert sorted(m.calibration["fitted_on"]) == sorted([f"{a}:0,1,2", f"{b}:1"])
        margins, mine = [], []
        for name, data in held.items():
            with torch.no_grad():
                logits = m(m.prepare(data.images))
            margins.append(logits[:, 0] - logits[:, 1])
            source = torch.tensor(data.source_classes)[data.labels]
            mine.append((source == m.source_class) & (name == m.ref.dataset))
        margin, target = torch.cat(margins).double(), torch.cat(mine)
        (a_new, b_new), (a_old, b_old) = m.calibration["platt"], m0.calibration["platt"]
        new_loss = float(balanced_bce(a_new * margin + b_new, target))
        assert new_loss <= float(balanced_bce(a_old * margin + b_old, target)) + 1e-6
        assert new_loss == pytest.approx(m.calibration["loss_platt"], abs=1e-5)


def test_refit_heads_is_the_balanced_logistic_optimum_on_the_composition_classes(two_models, tmp_path, capsys):
    from cnnmod.composition.fitting import observation_set
    from cnnmod.core.calibrate import balanced_bce
    from cnnmod.core.masking import masked_features

    dec_a, dec_b, a, b = two_models
    parts = [str(dec_a / "modules" / "c00-band0"), str(dec_b / "modules" / "c01-band1")]
    rc, _, err = run(["compose", *parts, "--out", str(tmp_path / "cl"), "--continuous-learning"], capsys)
    assert rc == 0, err
    rc, _, err = run(["compose", *parts, "--out", str(tmp_path / "refit"), "--continuous-learning",
                      "--refit-heads"], capsys)
    assert rc == 0, err
    learned, refit = cnnmod.load_modules(tmp_path / "cl"), cnnmod.load_modules(tmp_path / "refit")
    sets = {a: cnnmod.data.load(a, "train", classes=[0]), b: cnnmod.data.load(b, "train", classes=[1])}
    for m0, m in zip(learned, refit, strict=True):
        for name in m0.masks:  # the masks are continuous learning's; only the head changed
            assert torch.equal(m.masks[name], m0.masks[name])
        assert torch.equal(m.head_weight[1], m0.head_weight[1]) and m.head_bias[1] == m0.head_bias[1]
        per_class = m.settings["head_refit"]["per_class"]
        assert per_class == m.settings["observed"]
        feats, mine = [], []
        for name, data in sets.items():
            seen = observation_set(data, per_class, m.settings["seed"])
            masks = {k: v.unsqueeze(0) for k, v in m.masks.items()}
            with torch.no_grad():
                feats.append(masked_features(m.source.net, m.points, m.head, masks,
                                             m.prepare(seen.images))[0])
            source = torch.tensor(seen.source_classes)[seen.labels]
            mine.append((source == m.source_class) & (name == m.ref.dataset))
        f, t = torch.cat(feats).double(), torch.cat(mine)
        l2 = m.settings["head_refit"]["l2"]
        w = (m.head_weight[0] - m.head_weight[1]).double().requires_grad_(True)
        bias = (m.head_bias[0] - m.head_bias[1]).double().requires_grad_(True)
        loss = balanced_bce(f @ w + bias, t) + l2 * (w * w).sum()
        grads = torch.autograd.grad(loss, [w, bias])
        # stationary: the refitted margin is the optimum of the class-balanced logistic loss (with its L2 term) ...
        assert max(float(g.abs().max()) for g in grads) < 1e-3
        # ... so no worse than the paper's head on the same inputs
        w0 = (m0.head_weight[0] - m0.head_weight[1]).double()
        b0 = (m0.head_bias[0] - m0.head_bias[1]).double()
        assert float(loss.detach()) <= float(balanced_bce(f @ w0 + b0, t) + l2 * (w0 * w0).sum()) + 1e-9
    # on one data set, without continuous learning; the composition records it
    rc, _, err = run(["compose", str(dec_a), "--out", str(tmp_path / "intra"), "--refit-heads"], capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "intra" / "config.json").read_text())
    assert config["refit_heads"] is True and config["continuous_learning"] is False
    assert all(m.settings["head_refit"]["fitted_on"] == [f"{a}:0,1,2"] for m in cnnmod.load_modules(tmp_path / "intra"))


def test_joined_data_sets_and_training_on_them(tmp_path, capsys):
    a = f"npz:{write_npz(tmp_path / 'a.npz', classes=3, seed=0)}"
    joined = cnnmod.data.load(f"digits:3,5+{a}", "test")
    digits = cnnmod.data.load("digits:3,5", "test")
    other = cnnmod.data.load(a, "test")
    assert joined.class_names == ["digits:3", "digits:5", f"{a}:band0", f"{a}:band1", f"{a}:band2"]
    assert joined.input_shape == (1, 8, 8) and len(joined) == len(digits) + len(other)
    assert torch.equal(joined.labels, torch.cat([digits.labels, other.labels + 2]))
    assert torch.equal(joined.images[:len(digits)], digits.images)
    rc, stdout, err = run(["train", "--arch", "cnn", "--data", "digits:3,5", "--data", a, "--epochs", "1",
                           "--out", str(tmp_path / "joined"), "--json"], capsys)
    assert rc == 0, err
    model = cnnmod.load_model(tmp_path / "joined")
    assert model.class_names == joined.class_names and model.dataset == f"digits:3,5+{a}"
    energy = json.loads(stdout)["energy"]
    assert energy["training_to_best_epoch"]["kwh"] <= energy["training"]["kwh"]


def test_resized_training(tmp_path, capsys):
    rc, _, err = run(["train", "--arch", "cnn", "--data", "digits", "--input-size", "16x16", "--epochs", "1",
                      "--out", str(tmp_path / "d16")], capsys)
    assert rc == 0, err
    model = cnnmod.load_model(tmp_path / "d16")
    assert model.spec.shape == (1, 16, 16)
    # an 8x8 image is brought to 16x16 bilinearly: a ramp along the rows stays a ramp, output column i reading the
    # source at (i + 0.5) / 2 - 0.5, clamped to the edges; then normalised with the data's mean and std
    ramp = (torch.arange(8) * 30).to(torch.uint8).expand(1, 1, 8, 8).clone()
    at = ((torch.arange(16) + 0.5) / 2 - 0.5).clamp(0, 7)
    expected = ((30 * at / 255 - model.spec.mean[0]) / model.spec.std[0]).expand(16, 16)
    assert torch.allclose(model.prepare(ramp)[0, 0], expected, atol=1e-4)
    rc, _, err = run(["decompose", str(tmp_path / "d16"), "--out", str(tmp_path / "d16-dec"), "--set", "ci_samples=5"],
                     capsys)
    assert rc == 0, err
    assert cnnmod.load_modules(tmp_path / "d16-dec")[0].points[0].shape[1:] == (16, 16)
    assert_user_error(*run(["train", "--arch", "cnn", "--data", "digits", "--input-size", "big", "--out",
                            str(tmp_path / "x")], capsys), "--input-size")


def test_power_source_says_how_power_was_known():
    from cnnmod.energy import _power_source

    text, measured = _power_source("AMD EPYC", None, rapl=False)  # a machine without a readable RAPL counter
    assert not measured and text.startswith("estimated: CPU AMD EPYC (")
    assert _power_source("Intel Xeon", None, rapl=True) == ("measured: CPU Intel Xeon (RAPL)", True)
    text, measured = _power_source("AMD EPYC", "NVIDIA H100", rapl=False)
    assert not measured and text.startswith("measured GPU counters (NVIDIA H100), estimated CPU AMD EPYC")


def test_estimator_energy_is_power_times_time():
    meter = EnergyMeter("FRA", "estimator", watts=36.0)
    with meter.phase("work") as m:
        torch.randn(200, 200) @ torch.randn(200, 200)
    r = m.record
    assert r.kwh == pytest.approx(36.0 * r.seconds / 3.6e6, rel=1e-3)
    assert r.kg_co2e == pytest.approx(r.kwh * carbon_intensities()["FRA"] / 1000, rel=1e-9)
    assert r.paper_formula_kg_co2e == pytest.approx(r.kwh * PAPER_PUE * PAPER_KG_PER_KWH, rel=1e-9)
    assert not r.measured and r.power.startswith("estimated")
    half = r.prorated(0.5, "half")
    assert half.kwh == pytest.approx(r.kwh / 2) and half.phase == "half"


def test_codecarbon_measures_a_phase():
    meter = EnergyMeter("DEU", "codecarbon")
    with meter.phase("work") as m:
        x = torch.randn(300, 300)
        for _ in range(200):
            x = torch.tanh(x @ x.T / 300)
    r = m.record
    assert r.tracker == "codecarbon" and r.country == "DEU"
    # some energy, and no more than a kilowatt over the phase's seconds could draw on any machine that runs this
    assert 0 < r.kwh <= 1000 * r.seconds / 3.6e6
    assert r.kg_co2e == pytest.approx(r.kwh * carbon_intensities()["DEU"] / 1000, rel=1e-9)
    # how the power was known names the CPU codecarbon tracked (its public emissions data), measured exactly where
    # this process can read the RAPL counter
    from cnnmod.energy import rapl_readable

    assert r.power.startswith("measured" if rapl_readable() else "estimated") and "CPU" in r.power
    assert r.measured == rapl_readable()


def test_unknown_country_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="ISO 3166-1 alpha-3"):
        EnergyMeter("XYZ")
    assert_user_error(*run(["train", "--arch", "cnn", "--data", "digits", "--epochs", "1", "--country", "ZZZ",
                            "--out", str(tmp_path / "x")], capsys), "unknown country code 'ZZZ'")
    assert not (tmp_path / "x").exists()


def test_calibration_fit_recovers_a_known_scale():
    from cnnmod.core.calibrate import apply, fit

    g = torch.Generator().manual_seed(0)
    true_margin = torch.randn(20000, generator=g) * 2
    targets = torch.rand(20000, generator=g) < torch.sigmoid(true_margin)
    c = fit(5.0 * true_margin, targets)  # a module whose scores are 5x too confident
    assert c["temperature"] == pytest.approx(5.0, rel=0.1)
    assert c["platt"][0] == pytest.approx(0.2, rel=0.1) and abs(c["platt"][1]) < 0.1
    assert c["loss_temperature"] < c["loss_none"]
    m = torch.linspace(-3, 3, 13)
    assert torch.equal(apply(m, c, "temperature") > 0.5, m > 0)  # a temperature never moves the vote threshold
    assert torch.equal(apply(m, None, "platt"), torch.sigmoid(m))


def test_calibrated_composition(two_models, tmp_path, capsys):
    dec_a, dec_b, a, b = two_models
    modules = cnnmod.load_modules(dec_a) + [cnnmod.load_module(dec_b / "modules" / "c01-band1")]
    assert all(m.calibration and m.calibration["per_class"] == 100 for m in modules)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    assert all(m.typical is not None for m in modules)  # saved and loaded with the module
    for mode in ("none", "temperature", "platt", "platt-ood"):
        scores = cnnmod.compose(modules, calibration=mode)(images)
        for i, m in enumerate(modules):
            assert torch.allclose(scores[:, i], m.score(m.prepare(images), mode), atol=1e-6)
    out = tmp_path / "calibrated"
    rc, stdout, err = run(["compose", str(dec_a), str(dec_b / "modules" / "c01-band1"), "--out", str(out),
                           "--calibration", "platt", "--json"], capsys)
    assert rc == 0, err
    rc, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["calibration"] == "platt"
    # modules made without calibration cannot be composed with it
    rc, _, err = run(["decompose", str(tmp_path / "ma"), "--out", str(tmp_path / "nocal"), "--set",
                      "calibration_samples=0"], capsys)
    assert rc == 0, err
    assert_user_error(*run(["compose", str(tmp_path / "nocal"), "--out", str(tmp_path / "x"), "--calibration",
                            "platt"], capsys), "no calibration")
    assert_user_error(*run(["compose", str(dec_a), "--out", str(tmp_path / "x"), "--calibration", "magic"], capsys),
                      "unknown calibration")
    assert_user_error(*run(["compose", str(dec_a), "--out", str(tmp_path / "x"), "--calibration", "platt-ood",
                            "--mode", "merged"], capsys), "--mode vote")
    assert not (tmp_path / "x").exists()


def test_typical_distances_match_a_hand_computation():
    """Two layers, two classes: the fitted distances are the Mahalanobis distances to the nearest class mean
    under the pooled covariance (computed here in numpy), and the p-values rank the held-out inputs."""
    import numpy as np

    from cnnmod.core.calibrate import _RIDGE, TYPICAL_ALPHA, _distances, fit_typical, typicality

    g = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(300)
    centre = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    layer0 = centre[labels] + torch.randn(600, 2, generator=g) * torch.tensor([1.0, 2.0])
    layer1 = torch.randn(600, 3, generator=g) + labels[:, None] * 5.0
    held = [centre[labels[:200]] + torch.randn(200, 2, generator=g) * torch.tensor([1.0, 2.0]),
            torch.randn(200, 3, generator=g) + labels[:200, None] * 5.0]
    stats = fit_typical([layer0, layer1], labels, held)
    x0, lab = layer0.double().numpy(), labels.numpy()
    means = np.stack([x0[lab == c].mean(0) for c in (0, 1)])
    r = x0 - means[lab]
    cov = r.T @ r / len(r)
    cov += _RIDGE * np.trace(cov) / 2 * np.eye(2)
    probe = np.array([[0.5, -1.0], [9.0, 3.0], [30.0, 30.0]])
    expected = np.stack([np.einsum("bi,ij,bj->b", probe - mu, np.linalg.inv(cov), probe - mu) for mu in means]).min(0)
    got = _distances(stats, 0, torch.tensor(probe, dtype=torch.float32))
    assert np.allclose(got.numpy(), expected, rtol=1e-4)
    # on the held-out inputs themselves the p-values are their ranks: (M - i + 1) / (M + 1), i-th nearest
    gate = typicality(stats, held).sort(descending=True).values
    m = len(held[0])
    ranks = ((m - torch.arange(m) + 1) / (m + 1) / TYPICAL_ALPHA).clamp(max=1)
    assert torch.allclose(gate, ranks, atol=1.01 / ((m + 1) * TYPICAL_ALPHA))
    assert float((gate == 1).float().mean()) == pytest.approx(1 - TYPICAL_ALPHA, abs=2 / m)
    far = [torch.full((1, 2), 50.0), torch.full((1, 3), 50.0)]
    assert float(typicality(stats, far)) == pytest.approx(1 / ((m + 1) * TYPICAL_ALPHA))


def test_platt_ood_passes_own_images_and_stops_foreign_ones(two_models):
    """A module's in-distribution test, measured through a composition, scores its own held-out training
    inputs by rank (as fitted) and pushes noise images, which no training set holds, to the floor."""
    from cnnmod.composition.fitting import calibration_set
    from cnnmod.core.calibrate import TYPICAL_ALPHA, apply, typicality

    dec_a, _, a, _ = two_models
    modules = cnnmod.load_modules(dec_a)
    held = calibration_set(cnnmod.data.load(a, "train"), modules[0].calibration["per_class"], 0)
    noise = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    comp = cnnmod.compose(modules, calibration="platt-ood")
    with torch.no_grad():
        for images, own in ((held.images, True), (noise, False)):
            per_module = comp.group_layers(comp.groups[0], images)
            gates = torch.stack([typicality(m.typical, layers) for m, layers in zip(modules, per_module, strict=True)])
            platt = torch.stack([apply(layers[-1] @ (m.head_weight[0] - m.head_weight[1]) + m.head_bias[0]
                                       - m.head_bias[1], m.calibration, "platt")
                                 for m, layers in zip(modules, per_module, strict=True)])
            assert torch.allclose(comp(images).T, platt * gates, atol=1e-6)  # the scores: Platt times the gate
            m = int(modules[0].typical["held"].numel())
            if own:
                assert float((gates > 0.999).float().mean()) == pytest.approx(1 - TYPICAL_ALPHA, abs=0.05)
            else:
                assert float(gates.max()) < 2 / ((m + 1) * TYPICAL_ALPHA)


def test_merged_and_fused_compositions(two_models, tmp_path, capsys):
    from cnnmod.core.cost import cost_report
    from cnnmod.node.module import Module

    dec_a, dec_b, a, b = two_models
    modules = cnnmod.load_modules(dec_a)
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    merged = cnnmod.compose(modules, mode="merged")
    union = {k: torch.stack([m.masks[k] for m in modules]).any(0) for k in modules[0].masks}
    for i, m in enumerate(modules):  # each column: the module's head on the union-masked network
        alone = Module(m.source, m.graph, m.concerned, union, m.head_weight, m.head_bias)
        assert torch.allclose(merged(images)[:, i], alone.score(alone.prepare(images)), atol=1e-6)
    assert cost_report(merged, images)["flops_fraction"] == pytest.approx(1.0, rel=0.01)   # one pass
    assert cost_report(cnnmod.compose(modules, mode="vote"), images)["flops_fraction"] == pytest.approx(3.0, rel=0.01)
    assert cost_report(cnnmod.compose(modules), images)["flops_fraction"] == pytest.approx(1.0, rel=0.01)  # default
    other = cnnmod.load_module(dec_b / "modules" / "c01-band1")
    with pytest.raises(UserError, match="mode fused"):
        cnnmod.compose(modules + [other], mode="merged")
    fused = cnnmod.compose(modules + [other], mode="fused", calibration="none")
    assert torch.allclose(fused(images)[:, :3], merged(images), atol=1e-6)
    assert torch.allclose(fused(images)[:, 3], other.score(other.prepare(images)), atol=1e-6)
    out = tmp_path / "merged"
    rc, _, err = run(["compose", str(dec_a), "--mode", "merged", "--out", str(out)], capsys)
    assert rc == 0, err
    rc, stdout, err = run(["evaluate", str(out), "--json", "--latency-batch", "4"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["mode"] == "merged"
    assert_user_error(*run(["compose", str(dec_a), "--mode", "blend", "--out", str(tmp_path / "x")], capsys),
                      "unknown composition mode")


def test_cached_module_scores_give_the_composition_figures(two_models):
    """A study's cache of each module's test scores changes no figure of any composition that reuses them."""
    from cnnmod.composition.evaluate import evaluate_composition

    dec_a, dec_b, _, _ = two_models
    a, b = cnnmod.load_modules(dec_a), cnnmod.load_modules(dec_b)
    cache: dict = {}
    for calibration in ("none", "platt-ood"):
        for modules in ([a[0], a[1], b[1]], [a[0], a[2], b[1]], [a[2], b[0]]):
            comp = cnnmod.compose(modules, calibration=calibration)
            fresh = evaluate_composition(comp, None, torch.device("cpu"))
            cached = evaluate_composition(comp, None, torch.device("cpu"), cache=cache)
            for key in ("composed_top1", "composed_top5", "composed_balanced_top1", "test_images"):
                assert cached[key] == pytest.approx(fresh[key], abs=1e-9), key
            assert [c["binary_accuracy"] for c in cached["per_class"]] == pytest.approx(
                [c["binary_accuracy"] for c in fresh["per_class"]], abs=1e-9)
    # each module's scores on each test chunk once: per calibration, the first composition scores 2 chunks x 3
    # modules, the second reuses a[0] and b[1] on b's chunk (3 + 1 new), the third 2 chunks x 2 modules
    assert len(cache) == 2 * (6 + 4 + 4)
