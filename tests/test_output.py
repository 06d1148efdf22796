"""What a person reads: results on stdout and the rest on stderr, tables that fit the terminal, summary lines with
the figures promised, hints that name options the command has, mistakes that say what was expected."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_user_error, run

from cnnmod.cli import command_line_flags, commands, options_of

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnmod"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A small CNN's node-level and slim decompositions (made once; tests that break a folder copy it first)."""
    from conftest import write_npz

    from cnnmod.cli import main

    tmp = tmp_path_factory.mktemp("made")
    data = f"npz:{write_npz(tmp / 'bands.npz')}"
    model, node, slim = tmp / "model", tmp / "node", tmp / "slim"
    assert main(["train", "--arch", "cnn", "--data", data, "--epochs", "3", "--batch-size", "16", "--optimizer",
                 "adam", "--lr", "0.01", "--out", str(model), "--json"]) == 0
    for out, extra in ((node, []), (slim, ["--granularity", "channel", "--set", "samples=20"])):
        assert main(["decompose", str(model), "--out", str(out), "--json", *extra]) == 0
    return {"model": model, "node": node, "slim": slim, "tmp": tmp}


def test_results_go_to_stdout_and_fit_80_columns(made, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for argv in (["evaluate", str(made["node"]), "--no-cost"], ["evaluate", str(made["slim"]), "--no-cost"],
                 ["decompose", str(made["model"]), "--out", str(made["tmp"] / "again")]):
        rc, out, err = run(argv, capsys)
        assert rc == 0, err
        assert "summary" in out and "summary" not in err  # `cnnmod evaluate x > out.txt` keeps the tables
        assert "┃" in out or "│" in out
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert not wide, wide
        assert "…" not in out  # no header or figure cut short
        assert " None" not in out  # nothing the run did not measure (training_seconds of an imported model)


def test_the_slim_decomposition_is_evaluated_saying_how_it_runs(made, capsys):
    rc, out, err = run(["evaluate", str(made["slim"])], capsys)
    assert rc == 0, err
    assert "evaluated as the modules voting" in err and f"cnnmod compose {made['slim']} --out DIR" in err


def test_compose_says_what_the_composition_scores(made, capsys):
    for argv in (["compose", f"{made['slim']}:0,2", "--out", str(made["tmp"] / "pair")],
                 ["compose", f"{made['node']}:0,1", "--out", str(made["tmp"] / "votes")]):
        rc, out, err = run(argv + ["--json"], capsys)
        assert rc == 0, err
        r = json.loads(out)
        assert 0 <= r["composed_top1"] <= 100 and 0 <= r["model_top1"] <= 100 and r["test_images"] > 0
        rc, out, _ = run(argv[:-2] + ["--out", argv[-1] + "-text"], capsys)
        assert re.search(r"summary\s+top-1 [0-9.]+ % \(model [0-9.]+, [+-][0-9.]+ pp\)", out), out


def test_compose_without_modules_is_one_line(capsys):
    assert_user_error(*run(["compose", "--out", "x"], capsys), "nothing to compose", "DIR:0,6")


def test_mistaken_paths_say_what_was_expected_and_what_makes_it(made, capsys, tmp_path):
    assert_user_error(*run(["evaluate", str(tmp_path / "nope")], capsys), "does not exist", "cnnmod decompose")
    slim, node = shutil.copytree(made["slim"], tmp_path / "slim"), shutil.copytree(made["node"], tmp_path / "node")
    module = slim / "modules" / "c00-band0"
    (module / "config.json").unlink()
    assert_user_error(*run(["evaluate", str(module)], capsys), "has no config.json", "module folder inside one")
    shutil.rmtree(node / "model")
    assert_user_error(*run(["evaluate", str(node)], capsys), "source model", "is not at",
                      "copy the source model folder")
    assert_user_error(*run(["export", str(made["model"]), "--onnx", str(tmp_path / "m.onnx")], capsys),
                      "model folder", "cnnmod decompose")
    assert not (tmp_path / "m.onnx").exists()


def test_every_hint_names_an_option_of_the_command_that_prints_it():
    """Every setting a message of the library names («name»), as each command would print it: one of that
    command's options, its ``--set``, or an option of another command that says which."""
    named = set()
    for path in SRC.rglob("*.py"):
        named.update(re.findall(r"«(\w+)»", path.read_text()))
    assert {"resize", "size", "overwrite", "mean", "step"} <= named
    every = commands()
    for name, command in every.items():
        options = options_of(command)
        word = command_line_flags(name)
        for setting in named:
            text = word(setting)
            flags = re.findall(r"--[a-z][a-z-]*", text)
            if not flags:
                continue
            if "(--set" in text:
                assert "--set" in options, (name, setting, text)
                continue
            other = re.search(r"of cnnmod ([a-z -]+)$", text)
            if other:
                assert flags[0] not in options and flags[0] in options_of(every[other.group(1)]), (name, text)
            else:
                assert flags[0] in options, (name, setting, text)
    assert command_line_flags("evaluate")("resize") == "--resize of cnnmod evaluate-model"


def test_a_model_of_the_users_code_says_how_to_trust_it_once(tmp_path, npz_data, capsys, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\n"
        "def Net(num_classes=3, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import torch
    from mynet import Net

    torch.save(Net().state_dict(), tmp_path / "w.pt")
    rc, _, err = run(["import", "--arch", "mynet:Net", "--weights", str(tmp_path / "w.pt"), "--data", npz_data,
                      "--mean", "0", "--std", "1", "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    assert "export CNNMOD_TRUSTED_CODE=mynet" in err
    assert "export CNNMOD_TRUSTED_CODE=mynet" in (tmp_path / "m" / "README.md").read_text()
    assert_user_error(*run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "d")], capsys),
                      "--trust-code", "export CNNMOD_TRUSTED_CODE=mynet")
    monkeypatch.setenv("CNNMOD_TRUSTED_CODE", "mynet")  # once for the shell: every later command loads it
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "d")], capsys)
    assert rc == 0, err
    assert "CNNMOD_TRUSTED_CODE=mynet" in (tmp_path / "d" / "README.md").read_text()
