"""What a user gets without options: the best measured recipes, a short command line that starts without torch,
their own module found where they stand, the Python API in the command line's words, and each module alone a
detector whose figures on its card can be recomputed from its scores."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run, train_small_cnn

import cnnmod
from cnnmod.composition.build import mode_and_calibration
from cnnmod.modules.kinds import kind_named
from cnnmod.node import DecomposeSettings
from cnnmod.node.kind import node_settings
from cnnmod.recipes import settings_for
from cnnmod.slim import RECIPES, MergedSlim
from cnnmod.slim.config import slim_settings

CLI = [sys.executable, "-c", "import sys; from cnnmod.cli import main; rc = main(sys.argv[1:]); "
       "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"]


def test_the_best_recipe_is_the_measured_one_for_the_size_asked():
    assert slim_settings() == replace(RECIPES["cheap"], default_size=True)     # half, a target (not asked for)
    assert slim_settings(size=0.75) == replace(RECIPES["cheap"], size=0.75)
    assert slim_settings(size=0.25) == RECIPES["small"]                          # a quarter
    assert slim_settings(size=0.35) == replace(RECIPES["small"], size=0.35)
    # fitted to the run: a loss bound takes each module's own budget; some classes only, no joint refit
    assert slim_settings(max_loss=1.0).budget == "module" and slim_settings(max_loss=1.0).size is None
    assert slim_settings(size=0.25, every_class=False).joint_heads == 0
    spread = slim_settings(size=0.25, one_process=False)  # under torchrun: each module pruned alone
    assert (spread.budget, spread.joint_heads) == ("module", 0)
    # a recipe named is taken as it is, a field given beside it overriding it
    assert slim_settings("cheap", size=0.6) == replace(RECIPES["cheap"], size=0.6)
    assert slim_settings(size=0.25, step=0.3).step == 0.3
    # node-level: switch off only where a ReLU follows; the paper's own settings one name away
    assert node_settings() == DecomposeSettings(exact_only=True)
    assert node_settings("paper") == DecomposeSettings()
    with pytest.raises(cnnmod.UserError, match="'tau' is not a setting of node-level modules"):
        settings_for(kind_named("node"), tau=0.1)
    with pytest.raises(cnnmod.UserError, match="size applies to slim modules: add granularity channel"):
        settings_for(kind_named("node"), size=0.5)


def test_how_a_composition_runs_follows_what_its_modules_are(tmp_path, npz_data, capsys):
    train_small_cnn(tmp_path / "a", npz_data, capsys, epochs=1)
    train = cnnmod.data.load(npz_data, "train")
    model = cnnmod.load_model(tmp_path / "a")
    one = cnnmod.decompose(model, train, recipe=DecomposeSettings(ci_samples=10, calibration_samples=5))
    assert mode_and_calibration(one, None, None)[:2] == ("merged", "none")      # one model: one pass, its own scores
    assert mode_and_calibration(one, None, "platt")[:2] == ("merged", "platt")
    # the in-distribution test reads each module's own pass
    assert mode_and_calibration(one, None, "platt-ood")[:2] == ("vote", "platt-ood")
    assert mode_and_calibration(one, "vote", None)[:2] == ("vote", "none")
    other = copy.deepcopy(model)  # another model of the same data set
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    two = cnnmod.decompose(other, train, recipe=DecomposeSettings(ci_samples=10, calibration_samples=5))
    mixed = [one[0], two[1]]
    assert mode_and_calibration(mixed, None, None)[:2] == ("vote", "platt")      # two models of one data set
    no_calibration = cnnmod.decompose(other, train, recipe=DecomposeSettings(ci_samples=10, calibration_samples=0))
    assert mode_and_calibration([one[0], no_calibration[1]], None, None)[:2] == ("vote", "none")


def test_version_and_help_start_without_torch_and_help_is_short():
    out = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"cnnmod {cnnmod.__version__}", "no torch"]
    done = subprocess.run([*CLI, "decompose", "--help"], capture_output=True, text=True, env={"COLUMNS": "200"})
    assert done.returncode == 0 and done.stdout.strip().endswith("no torch")
    import typer

    from cnnmod.cli import app

    command = typer.main.get_command(app).commands["decompose"]
    shown = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
    assert 10 <= len(shown) and len(shown) + 1 <= 16  # with --help
    assert "--trust-code" in done.stdout and "--skip-bad-images" in done.stdout  # every command takes them
    assert "<bool>" not in done.stdout


def test_the_console_script_finds_the_users_module_where_they_stand(tmp_path, npz_data):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n\n"
        "def Net(num_classes=3, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n")
    torch.manual_seed(0)
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    torch.save({"model": net.state_dict(), "epoch": 1}, tmp_path / "ckpt.pth")
    script = Path(sys.executable).parent / "cnnmod"
    done = subprocess.run([str(script), "import", "--arch", "mynets:Net", "--weights", "ckpt.pth", "--data", npz_data,
                           "--mean", "0", "--std", "1", "--out", "m", "--json"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["out"] == "m" and (tmp_path / "m" / "model.safetensors").exists()


def test_the_python_api_makes_slim_modules_and_merges_them_as_the_command_line_does(tmp_path, npz_data, capsys):
    rc, _, err = run(["train", "--arch", "resnet20", "--arch-arg", "width=8", "--data", npz_data, "--epochs", "1",
                      "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    model = cnnmod.load_model(tmp_path / "m")
    train = cnnmod.data.load(npz_data, "train")
    modules = cnnmod.decompose(model, train, granularity="channel", size=0.5, samples=20, calibration_samples=5)
    assert {m.settings["recipe"] for m in modules} == {"cheap"} and all(m.calibration for m in modules)
    clf = cnnmod.compose(modules[:2])          # one model's slim modules at hand: one merged network
    assert isinstance(clf, MergedSlim) and clf.concerned == [0, 1]
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert clf(images).shape == (4, 2)
    report = cnnmod.evaluate(clf, model=model)
    test = cnnmod.data.load(npz_data, "test").subset([0, 1])
    with torch.no_grad():
        expected = 100.0 * float((clf(test.images).argmax(1) == test.labels).float().mean())
    assert report["composed_top1"] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(cnnmod.UserError, match="not a setting of slim modules"):
        cnnmod.decompose(model, train, granularity="channel", tau=0.3)


def test_each_module_alone_is_a_detector_with_its_figures_on_its_card(tmp_path, npz_data, capsys):
    train_small_cnn(tmp_path / "m", npz_data, capsys, epochs=2)
    rc, stdout, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "d"), "--classes",
                           "band0,2", "--set", "calibration_samples=10", "--json"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    assert [e["class"] for e in result["modules"]] == [0, 2]  # by name or index
    modules = cnnmod.load_modules(tmp_path / "d")
    model = cnnmod.load_model(tmp_path / "m")
    test = cnnmod.data.load(npz_data, "test").subset([0, 2])
    with torch.no_grad():
        predicted = model(model.prepare(test.images)).argmax(1)
    for i, (m, entry) in enumerate(zip(modules, result["modules"], strict=True)):
        with torch.no_grad():
            votes = m.score(m.prepare(test.images), "platt") > 0.5
        mine = test.labels == i
        tpr, tnr = 100 * float(votes[mine].float().mean()), 100 * float((~votes[~mine]).float().mean())
        assert entry["true_positive_rate"] == pytest.approx(tpr, abs=1e-3)
        assert entry["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2, abs=1e-3)
        own = predicted == m.concerned
        model_ba = (100 * float(own[mine].float().mean()) + 100 * float((~own[~mine]).float().mean())) / 2
        assert entry["model_balanced_accuracy"] == pytest.approx(model_ba, abs=1e-3)
        assert m.metrics["balanced_accuracy"] == entry["balanced_accuracy"]
        card = (Path(entry["path"]) / "README.md").read_text()
        assert f"balanced accuracy {entry['balanced_accuracy']:.2f} %" in card
        assert f"one-vs-rest decision on the same images: balanced accuracy {model_ba:.2f} %" in card
    # the command's seconds are its wall clock, its parts beside it
    assert result["seconds"] >= result["decomposition_seconds"] + result["calibration_seconds"] + \
        result["measure_seconds"] - 1e-3
    # read by a person: a summary of what the modules come to and what making them cost
    rc, out, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "d2"), "--set",
                        "calibration_samples=10"], capsys)
    assert rc == 0 and "summary" in out and "modules alone: balanced accuracy" in out, err
    assert "g CO2e (estimated)" in out or "g CO2e (measured)" in out
