"""Merged and fused slim compositions: one network of one model's slim modules, and merged networks of several
models side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run

import cnnmod
from cnnmod.core.observe import class_order
from cnnmod.data.dataset import split_train_val


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
