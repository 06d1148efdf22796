"""ONNX export of node-level and slim compositions, checked against onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, run

import cnnmod


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
