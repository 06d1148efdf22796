"""Modules on disk and the decompose / evaluate commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run, train_small_cnn

import cnnmod
from cnnmod.node.artifact import pack_mask, unpack_mask


@pytest.fixture
def model_dir(tmp_path: Path, npz_data: str, capsys) -> Path:
    out = tmp_path / "model"
    train_small_cnn(out, npz_data, capsys, epochs=3)
    return out


@pytest.fixture
def decomposition(tmp_path: Path, model_dir: Path, capsys) -> tuple[Path, dict]:
    out = tmp_path / "dec"
    rc, stdout, err = run(["decompose", str(model_dir), "--out", str(out), "--variant", "mc-bi", "--json"], capsys)
    assert rc == 0, err
    return out, json.loads(stdout)


def test_pack_unpack_masks_of_any_size():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (3, 5, 5), (16, 28, 28), (2, 3)]:
        mask = torch.rand(shape, generator=g) < 0.4
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)


def test_decompose_command_writes_every_module(decomposition):
    out, result = decomposition
    assert set(result) >= {"out", "seconds", "variant", "modules"}
    assert result["variant"] == "mc-bi" and len(result["modules"]) == 3
    for entry in result["modules"]:
        assert set(entry) >= {"class", "name", "path", "kept_fraction"}
        config = json.loads((Path(entry["path"]) / "config.json").read_text())
        assert config["kind"] == "module" and config["concerned_class"] == entry["class"]
        assert config["settings"]["variant"] == "mc-bi" and 0 < config["metrics"]["kept_fraction"] <= 1
        assert config["source"]["weights_sha256"] == json.loads((out / "model" / "config.json").read_text())[
            "weights_sha256"]
        assert 0 <= config["metrics"]["binary_accuracy"] <= 100
    assert (out / "README.md").read_text().startswith("# Decomposition of cnn")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".dec.tmp")]


def test_evaluate_command_is_consistent_with_the_model(decomposition, model_dir, capsys):
    out, _ = decomposition
    rc, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    for key in ("model_top1", "model_top5", "composed_top1", "composed_top5", "top1_change_pp",
                "top5_change_pp", "jaccard_model_mean", "jaccard_pairwise_mean", "per_class", "seconds"):
        assert key in r
    rc, stdout, _ = run(["evaluate-model", str(model_dir), "--json"], capsys)
    assert r["model_top1"] == json.loads(stdout)["top1"]  # the model's figure is the model's, by another path
    assert r["top1_change_pp"] == pytest.approx(r["composed_top1"] - r["model_top1"], abs=1e-3)
    counts = [c["count"] for c in r["per_class"]]
    weighted = sum(c["composed_top1"] * n for c, n in zip(r["per_class"], counts, strict=True)) / sum(counts)
    assert weighted == pytest.approx(r["composed_top1"], abs=1e-3)
    kept = [c["kept_fraction"] for c in r["per_class"]]
    assert r["jaccard_model_mean"] == pytest.approx(sum(kept) / len(kept), abs=1e-5)
    # the mean pairwise Jaccard index of the modules' kept nodes, counted from their masks as sets of node indices
    nodes = [set(torch.cat([v.reshape(-1) for v in m.masks.values()]).nonzero().flatten().tolist())
             for m in cnnmod.load_modules(out)]
    pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    expected = sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)
    assert r["jaccard_pairwise_mean"] == pytest.approx(expected, abs=1e-5)


def test_loaded_modules_score_like_the_originals(decomposition, tmp_path):
    out, _ = decomposition
    modules = cnnmod.load_modules(out)
    assert [m.concerned for m in modules] == [0, 1, 2]
    assert len({id(m.source) for m in modules}) == 1  # one source model, shared
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    scores = cnnmod.compose(modules, mode="vote")(images)
    # decomposing the loaded source again with the recorded settings gives the same modules
    source = modules[0].source
    train = cnnmod.data.load(source.dataset, "train")
    again = cnnmod.decompose(source, train, "mc-bi")
    assert torch.equal(cnnmod.compose(again, mode="vote")(images), scores)
    # a module folder copied with its source (same relative places) loads anywhere and scores the same
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "model", elsewhere / "model")
    shutil.copytree(out / "modules" / "c01-band1", elsewhere / "modules" / "c01-band1")
    moved = cnnmod.load_module(elsewhere / "modules" / "c01-band1")
    assert torch.equal(moved.score(moved.prepare(images)), scores[:, 1])


def test_a_module_refuses_another_source_and_tampering(decomposition, tmp_path, npz_data, capsys):
    out, _ = decomposition
    # another model in the source's place: its own checksum is fine, but it is not the module's source
    rc, _, err = run(["train", "--arch", "cnn", "--data", npz_data, "--epochs", "1", "--seed", "5",
                      "--out", str(tmp_path / "other")], capsys)
    assert rc == 0, err
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    shutil.rmtree(swapped / "model")
    shutil.copytree(tmp_path / "other", swapped / "model", ignore=shutil.ignore_patterns("last"))
    assert_user_error(*run(["evaluate", str(swapped)], capsys), "not the one the module was made from")
    # a module whose weights file was changed
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    weights = tampered / "modules" / "c02-band2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_user_error(*run(["evaluate", str(tampered)], capsys), "does not match the checksum")
    # a module without its source beside it
    lonely = tmp_path / "lonely"
    shutil.copytree(out / "modules" / "c00-band0", lonely / "a" / "b")
    assert_user_error(*run(["evaluate", str(lonely / "a" / "b")], capsys), "source model is not at")


def test_decompose_bad_input(model_dir, tmp_path, capsys):
    target = tmp_path / "dec"
    assert_user_error(*run(["decompose", str(model_dir), "--out", str(target), "--data", "digits"], capsys),
                      "3 classes")
    assert_user_error(*run(["decompose", str(model_dir), "--out", str(target), "--variant", "xyz"], capsys),
                      "unknown variant")
    assert_user_error(*run(["decompose", str(model_dir), "--out", str(target), "--classes", "0,7"], capsys),
                      "no class 7")
    assert_user_error(*run(["decompose", str(model_dir), "--out", str(target), "--set", "ci_samples=0"], capsys),
                      "ci_samples (--set ci_samples=...) must be at least 1")
    assert not target.exists()
    assert_user_error(*run(["decompose", str(tmp_path / "nope"), "--out", str(target)], capsys), "nope")
    target.mkdir()
    assert_user_error(*run(["decompose", str(model_dir), "--out", str(target)], capsys), "--overwrite")


def test_decompose_some_classes_then_evaluate_them(model_dir, tmp_path, capsys):
    out = tmp_path / "two"
    rc, stdout, err = run(["decompose", str(model_dir), "--out", str(out), "--classes", "0,2", "--json",
                           "--set", "ci_samples=5"], capsys)
    assert rc == 0, err
    assert [m["class"] for m in json.loads(stdout)["modules"]] == [0, 2]
    rc, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert [c["class"] for c in r["per_class"]] == [0, 2] and r["test_images"] == sum(
        c["count"] for c in r["per_class"])
    config = json.loads((out / "modules" / "c00-band0" / "config.json").read_text())
    assert config["settings"]["observed"] == 5 and config["settings"]["ci_samples"] == 5



def test_torchrun_decomposition_equals_single_process(model_dir, decomposition, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import _free_port

    out, _ = decomposition
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "cnnmod", "decompose", str(model_dir), "--variant", "mc-bi",
           "--device", "cpu", "--batch-size", "7", "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("{")]) == 1  # only rank 0 reports
    single, sharded = cnnmod.load_modules(out), cnnmod.load_modules(tmp_path / "ddp")
    for a, b in zip(single, sharded, strict=True):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
        # calibration (each rank fits every other module) and the measured accuracy (scoring sharded) too
        assert a.metrics["binary_accuracy"] == b.metrics["binary_accuracy"]
        assert a.calibration.keys() == b.calibration.keys()
        for key, value in a.calibration.items():
            assert value == pytest.approx(b.calibration[key], rel=1e-5, abs=1e-6), key
        assert all(torch.allclose(a.typical[k], b.typical[k], rtol=1e-5, atol=1e-6) for k in a.typical)


def test_cost_of_modules_and_compositions(decomposition, capsys):
    from cnnmod.core.cost import cost_report, count_params

    out, _ = decomposition
    modules = cnnmod.load_modules(out)
    source = modules[0].source
    model_params = sum(p.numel() for p in source.net.parameters())
    features = modules[0].head_weight.shape[1]
    assert count_params(modules[0]) == model_params + 2 * features + 2  # node masks remove no weight
    comp = cnnmod.compose(modules, mode="vote")
    assert count_params(comp) == model_params + 3 * (2 * features + 2)  # the source once, three heads
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    report = cost_report(comp, images)
    assert report["flops_fraction"] == pytest.approx(3.0, rel=0.01)  # three model passes, batched
    assert cost_report(cnnmod.compose([modules[1]]), images)["flops_fraction"] == pytest.approx(1.0, rel=0.01)
    rc, stdout, err = run(["evaluate", str(out), "--json", "--latency-batch", "8"], capsys)
    assert rc == 0, err
    cost = json.loads(stdout)["cost"]
    assert cost["composition"]["latency_batch"] == 8 and cost["module_mean"]["params_fraction"] > 1
    assert set(cost["composition"]) >= {"params", "flops", "latency_ms", "params_fraction", "flops_fraction",
                                        "latency_fraction"}


def test_latency_measured_side_by_side():
    """Each round times every function in turn; the fraction is the median of the rounds' ratios, so a round
    where the machine is busy for both sides (here: both 10x slower) leaves it unchanged."""
    import time

    from cnnmod.core.cost import latency_side_by_side

    calls = {"n": 0}

    def sleeper(ms: float):
        def fn(_):
            calls["n"] += 1
            # the warm-ups are calls 1-2; then each round times each function once after torch.utils.benchmark's
            # own two warm-up calls (6 calls a round): rounds 1-2, calls 3-14, are busy
            busy = 10 if 3 <= calls["n"] <= 14 else 1
            time.sleep(busy * ms / 1000)
        return fn

    (target, model), fraction = latency_side_by_side([sleeper(20), sleeper(10)], torch.zeros(1), repeats=5)
    assert calls["n"] == 2 + 2 * 3 * 5
    assert fraction == pytest.approx(2.0, rel=0.25)
    assert target >= 20 and model >= 10


def test_evaluate_takes_the_calibration_and_mode_asked(decomposition, model_dir, capsys):
    out, _ = decomposition
    rc, stdout, err = run(["evaluate", str(out), "--calibration", "platt", "--mode", "merged", "--no-cost", "--json"],
                          capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert (r["calibration"], r["mode"]) == ("platt", "merged")
    # the composition asked for, built here, scores the test split as the command says it did
    test = cnnmod.data.load(cnnmod.load_model(model_dir).dataset, "test")
    comp = cnnmod.compose(cnnmod.load_modules(out), calibration="platt", mode="merged").eval()
    expected = 100.0 * float((comp.predict(test.images) == test.labels).float().mean())
    assert r["composed_top1"] == pytest.approx(expected, abs=0.01)


def test_train_takes_its_options(tmp_path, npz_data, capsys):
    rc, _, err = run(["train", "--arch", "resnet20", "--arch-arg", "width=4", "--no-bn", "--data", npz_data,
                      "--epochs", "1", "--val-split", "0.25", "--weight-decay", "0.001", "--no-augment", "--out",
                      str(tmp_path / "m")], capsys)
    assert rc == 0, err
    assert "90 images, 30 for validation" in err  # a quarter of the 120 training images held out
    model = cnnmod.load_model(tmp_path / "m")
    t = model.info["training"]
    assert (t["val_split"], t["weight_decay"], t["augment"]) == (0.25, 0.001, False)
    assert model.arch_args["bn"] is False
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.net.modules())


def test_export_of_one_module_without_the_check(decomposition, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out, _ = decomposition
    folder = out / "modules" / "c01-band1"
    rc, stdout, err = run(["export", str(folder), "--onnx", str(tmp_path / "one.onnx"), "--no-check", "--json"],
                          capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    (module,) = cnnmod.load_modules(folder)
    assert r["classes"] == [module.ref.qualified] and "max_abs_difference" not in r  # not checked, as asked
    assert [o.name for o in onnx.load(str(tmp_path / "one.onnx")).graph.output] == ["scores"]
    images = torch.randint(0, 256, (r["batch"] if r["batch"] != "any" else 3, 1, 8, 8), dtype=torch.uint8)
    session = onnxruntime.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = module.score(module.prepare(images), "platt")  # alone, a detector: its calibrated probability
    assert r["calibration"] == "platt"
    assert got.shape == (images.shape[0], 1) and torch.allclose(got[:, 0], expected, atol=1e-5)
