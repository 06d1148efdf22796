"""Slim modules through the command line: decompose, their folders and cards, evaluation, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run

import cnnmod
from cnnmod.composition.fitting import calibration_set
from cnnmod.core.calibrate import TYPICAL_ALPHA, typicality


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
