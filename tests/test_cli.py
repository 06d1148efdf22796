"""The command line: JSON output, and one-line errors with exit status 2 for every user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run, train_small_cnn, write_npz
from safetensors.torch import save_file

from cnnmod.models import build


@pytest.fixture
def trained(tmp_path: Path, npz_data: str, capsys) -> Path:
    out = tmp_path / "model"
    result = train_small_cnn(out, npz_data, capsys, epochs=2)
    assert set(result) >= {"out", "epochs", "best_epoch", "test_top1", "test_top5", "seconds", "images_per_second"}
    return out


def test_data_info_json(npz_data: str, capsys) -> None:
    rc, out, _ = run(["data", "info", "digits", "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["num_classes"] == 10 and info["input_shape"] == [1, 8, 8]
    assert info["train_size"] + info["test_size"] == 1797
    assert set(info) == {"name", "num_classes", "class_names", "train_size", "test_size", "input_shape", "root"}


def test_evaluate_model_json(trained: Path, capsys) -> None:
    rc, out, err = run(["evaluate-model", str(trained), "--json"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert 0 <= result["top1"] <= result["top5"] <= 100 and len(result["per_class"]) == 3
    counts = sum(c["count"] for c in result["per_class"])
    weighted = sum(c["top1"] * c["count"] for c in result["per_class"]) / counts
    assert abs(weighted - result["top1"]) < 1e-3


def test_user_errors(tmp_path: Path, trained: Path, npz_data: str, capsys) -> None:
    base = ["train", "--arch", "cnn", "--epochs", "1", "--out", str(tmp_path / "new")]
    assert_user_error(*run(base + ["--data", "imagenet42"], capsys), "unknown data set 'imagenet42'")
    assert_user_error(*run(["train", "--arch", "resnet99", "--data", npz_data, "--out", str(tmp_path / "x")], capsys),
                      "unknown architecture")
    assert_user_error(*run(base + ["--data", npz_data, "--classes", "0,9"], capsys), "has no class 9")
    assert_user_error(*run(base + ["--data", npz_data, "--classes", "0,x"], capsys),
                      "no class named 'x'; the classes are band0")
    assert_user_error(*run(["train", "--arch", "cnn", "--data", npz_data, "--out", str(trained)], capsys),
                      "exists already", "--overwrite")
    assert_user_error(*run(base + ["--data", npz_data, "--arch-arg", "depth"], capsys), "KEY=VALUE")
    assert_user_error(*run(base + ["--data", npz_data, "--device", "tpu"], capsys), "unknown device 'tpu'")
    assert_user_error(*run(base + ["--data", npz_data, "--device", "cuda:7"], capsys), "cuda:7", "CUDA device")
    assert not (tmp_path / "new").exists()
    # evaluating against a data set of another class count
    assert_user_error(*run(["evaluate-model", str(trained), "--data", "digits"], capsys), "3 classes", "10")
    (trained / "model.safetensors").write_bytes(b"\x00" * 10)
    assert_user_error(*run(["evaluate-model", str(trained)], capsys), "checksum")
    assert_user_error(*run(["evaluate-model", str(tmp_path / "nothing")], capsys),
                      "does not exist: expected a model folder")


def test_import_state_dicts(tmp_path: Path, npz_data: str, capsys) -> None:
    torch.manual_seed(0)
    net = build("cnn", (1, 8, 8), 3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    results = []
    for name in ("w.pt", "w.safetensors"):
        rc, out, err = run(["import", "--arch", "cnn", "--weights", str(tmp_path / name), "--data", npz_data,
                            "--mean", "0.5", "--std", "0.25", "--out", str(tmp_path / f"m-{name}"), "--json"], capsys)
        assert rc == 0, err
        results.append(json.loads(out)["test_top1"])
    assert results[0] == results[1]
    # the normalisation is the user's to state: without it, one line naming the flags, nothing written
    assert_user_error(*run(["import", "--arch", "cnn", "--weights", str(tmp_path / "w.pt"), "--data", npz_data,
                            "--out", str(tmp_path / "unstated")], capsys), "state the normalisation", "--mean",
                      "--std")
    assert not (tmp_path / "unstated").exists()
    # weights of another architecture
    torch.save(build("mlp", (1, 8, 8), 3).state_dict(), tmp_path / "mlp.pt")
    assert_user_error(*run(["import", "--arch", "cnn", "--weights", str(tmp_path / "mlp.pt"), "--data", npz_data,
                            "--out", str(tmp_path / "bad")], capsys), "not a cnn", "missing conv1.bias")
    # a pickle that is not a plain state dict is refused by weights_only loading, in one line that says why
    torch.save({"model": np.zeros(3, dtype=object)}, tmp_path / "obj.pt")
    assert_user_error(*run(["import", "--arch", "cnn", "--weights", str(tmp_path / "obj.pt"), "--data", npz_data,
                            "--out", str(tmp_path / "bad")], capsys), "holds a pickled object", "state_dict()")
    # a whole pickled model: the same line, no terminal colour codes
    torch.save(build("cnn", (1, 8, 8), 3), tmp_path / "whole.pt")
    rc, _, err = run(["import", "--arch", "cnn", "--weights", str(tmp_path / "whole.pt"), "--data", npz_data,
                      "--out", str(tmp_path / "bad")], capsys)
    assert_user_error(rc, _, err, "holds a pickled object")
    assert "\x1b" not in err
    # a training checkpoint: the weights under "model" (or EMA weights, preferred) load; one without names its keys
    weights = build("cnn", (1, 8, 8), 3).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save({"model": weights, "model_ema": ema, "optimizer": {}, "epoch": 3}, tmp_path / "ckpt.pth")
    rc, stdout, err = run(["import", "--arch", "cnn", "--weights", str(tmp_path / "ckpt.pth"), "--data", npz_data,
                           "--mean", "0.5", "--std", "0.25", "--out", str(tmp_path / "ck"), "--json"], capsys)
    assert rc == 0, err
    import cnnmod

    loaded = cnnmod.load_model(tmp_path / "ck").net.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    torch.save({"module.": weights, "optimizer": {}, "epoch": 3}, tmp_path / "odd.pth")
    assert_user_error(*run(["import", "--arch", "cnn", "--weights", str(tmp_path / "odd.pth"), "--data", npz_data,
                            "--out", str(tmp_path / "bad")], capsys), "found: module., optimizer, epoch")
    assert not (tmp_path / "bad").exists()


def test_console_script_exit_status_and_usage(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cnnmod", "evaluate-model", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("cnnmod: error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cnnmod", "train", "--arch", "cnn"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Missing option" in proc.stderr


def test_version_prints_the_packages_version(capsys) -> None:
    from importlib.metadata import version

    rc, out, err = run(["version"], capsys)
    assert rc == 0 and out == f"cnnmod {version('cnnmod')}\n" and err == ""


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--val-split", "1.0"], "--val-split must be in [0, 1)"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
    (["--subset", "1"], "--subset must be at least 2 images"),
    (["--lr", "0"], "--lr must be positive"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--input-size", "0x4"], "--input-size '0x4' is not HEIGHTxWIDTH"),
])
def test_bad_training_values_are_one_line_and_write_nothing(tmp_path, npz_data, capsys, args, needle) -> None:
    out = tmp_path / "m"
    assert_user_error(*run(["train", "--arch", "cnn", "--data", npz_data, "--out", str(out), *args], capsys), needle)
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--set", "ci_samples=0"], "ci_samples (--set ci_samples=...) must be at least 1"),
    (["--set", "delta=-1"], "delta (--set delta=...) must be >= 0"),
    (["--set", "calibration_samples=-1"], "calibration_samples (--set calibration_samples=...) must be >= 0"),
    (["--variant", "mc-xyz"], "unknown variant 'mc-xyz'"),
    (["--granularity", "channel", "--set", "step_samples=1"],
     "step_samples (--set step_samples=...) must be at least 2"),
    (["--granularity", "channel", "--set", "samples=0"], "samples (--set samples=...) must be at least 1"),
    (["--granularity", "channel", "--set", "multiple=0"],
     "multiple (--set multiple=...) (keep channel counts a multiple of it) must be at least 1"),
    (["--granularity", "channel", "--recipe", "huge"], "unknown recipe 'huge'"),
    (["--granularity", "channel", "--max-loss", "-1"], "--max-loss must be >= 0 pp"),
    (["--granularity", "node", "--set", "step=0.3"], "'step' is not a setting here; the settings are: variant, delta"),
    (["--set", "tau=0.3"], "'tau' is not a setting here"),
    (["--set", "ci_samples=many"], "the setting ci_samples='many' is not a whole number"),
    (["--set", "nonsense"], "--set 'nonsense' is not KEY=VALUE"),
    (["--granularity", "node", "--recipe", "small"], "--recipe small makes slim modules: add --granularity channel"),
    (["--granularity", "channel", "--recipe", "paper"],
     "--recipe paper makes node-level modules: add --granularity node"),
    (["--granularity", "node", "--size", "0.3"], "--size applies to slim modules: add --granularity channel"),
    (["--variant", "mc", "--size", "0.3"], "these options ask for node-level modules and slim modules at once: choose "
     "one with --granularity"),
    (["--classes", "Jacket"], "no class named 'Jacket'; the classes are band0, band1, band2"),
])
def test_bad_decomposition_values_are_one_line_and_write_nothing(trained, tmp_path, capsys, args, needle) -> None:
    out = tmp_path / "d"
    assert_user_error(*run(["decompose", str(trained), "--out", str(out), *args], capsys), needle)
    assert not out.exists()


def test_import_takes_a_class_subset_and_a_crop(tmp_path: Path, npz_data: str, capsys) -> None:
    """Weights trained on two of the data set's three classes, evaluated center-cropped: the model folder records
    those classes (by name and index) and the crop, and prepares an image as a center crop of it."""
    torch.manual_seed(0)
    torch.save(build("cnn", (1, 4, 4), 2).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "m"
    rc, _, err = run(["import", "--arch", "cnn", "--weights", str(tmp_path / "w.pt"), "--data", npz_data,
                      "--classes", "2,0", "--input-size", "4x4", "--fit", "center-crop", "--crop", "0.5",
                      "--mean", "0.3", "--std", "0.3", "--out", str(out)], capsys)
    assert rc == 0, err
    import cnnmod

    model = cnnmod.load_model(out)
    assert model.class_names == ["band2", "band0"] and model.source_classes == [2, 0]
    assert (model.spec.fit, model.spec.crop) == ("center-crop", 0.5)
    # an 8x8 image: its shorter side to 4 / 0.5 = 8 (no resize), then the centre 4x4
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    expected = ((image[..., 2:6, 2:6].float() / 255 - model.spec.mean[0]) / model.spec.std[0])
    assert torch.allclose(model.prepare(image), expected, atol=1e-5)


def test_decompose_bad_batch_size_and_data_of_another_size(trained, tmp_path, capsys) -> None:
    out = tmp_path / "d"
    assert_user_error(*run(["decompose", str(trained), "--out", str(out), "--batch-size", "0"], capsys),
                      "--batch-size must be at least 1")
    # data of another image size is refused with a fix decompose has (it has no --resize)
    big = tmp_path / "big.npz"
    write_npz(big, size=12)
    assert_user_error(*run(["decompose", str(trained), "--out", str(out), "--data", f"npz:{big}"], capsys),
                      "the model takes 1x8x8 images", "give data of the model's input size")
    assert not out.exists()
