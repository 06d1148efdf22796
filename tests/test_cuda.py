"""The CUDA path computes what the CPU path computes. Skipped where no CUDA device is (CI); run on a lent GPU with
``benchmarks/gpu_check.sh``. TF32 is switched off here so that CUDA's float32 arithmetic is comparable to the
CPU's to about 1e-5."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_data, run, slim_with_reference, source, stopped_training

import cnnmod
from cnnmod.core.cost import cost_report
from cnnmod.jobs.train import train
from cnnmod.models.train import TrainSettings
from cnnmod.node.method import DecomposeSettings, decompose
from cnnmod.runtime import Passes
from cnnmod.slim import SlimSettings, merge_slim, slim_module
from cnnmod.slim.artifact import load_merged_slim, save_merged_slim
from cnnmod.slim.channels import classifier_input, gated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def images(n: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_node_modules_made_on_cuda_match_the_cpu_ones():
    clf, data = source("resnet20"), random_data(per_class=20)
    s = DecomposeSettings(calibration_samples=0)
    on_cpu = decompose(copy.deepcopy(clf), data, settings=s, passes=Passes("cpu"))
    on_gpu = decompose(copy.deepcopy(clf), data, settings=s, passes=Passes("cuda"))
    assert next(on_gpu[0].parameters()).is_cuda
    kept = [(mc.masks[k] == mg.masks[k].cpu()).float().mean() for mc, mg in zip(on_cpu, on_gpu, strict=True)
            for k in mc.masks]
    assert float(torch.stack(kept).min()) > 0.99  # only nodes whose activation rate sits on the threshold may flip
    x = images()
    gpu_scores = cnnmod.compose(on_gpu).eval()(x.cuda()).cpu()
    moved = cnnmod.compose([m.to("cpu") for m in on_gpu]).eval()(x)
    assert torch.allclose(gpu_scores, moved, atol=1e-4)


def test_slim_module_made_on_cuda_is_its_gated_network_and_moves_to_cpu():
    clf, data = source("resnet20").to("cuda"), random_data(per_class=20)
    m, (net, graph, groups, gates, hw, hb) = slim_with_reference(
        clf, data, 1, SlimSettings(size=0.4, samples=40, step=0.2, max_loss=5.0))
    assert next(m.parameters()).is_cuda
    # pruned until 0.4 of the parameters, or until the next step would lose more than 5 points on held-out data
    assert m.metrics["params_fraction"] <= 0.4 or len(m.metrics["history"]) > 1
    assert m.metrics["held_out_binary_accuracy_start"] - m.metrics["held_out_binary_accuracy"] <= 5.0
    x = torch.randn(9, 1, 12, 12, device="cuda")
    with torch.no_grad(), gated(net, graph, groups, gates):
        features = classifier_input(net, graph.head, lambda: net(x))
    expected = features @ hw.to("cuda").T + hb.to("cuda")  # a closed channel is not read: its features are 0
    with torch.no_grad():
        on_gpu = m(x)
        assert torch.allclose(on_gpu, expected, atol=1e-4)
        assert torch.allclose(copy.deepcopy(m).to("cpu")(x.cpu()), on_gpu.cpu(), atol=1e-4)


def test_merged_slim_on_cuda_saves_and_loads_on_cpu(tmp_path):
    clf, data = source("resnet20").to("cuda"), random_data(per_class=20)
    clf.arch = "resnet20"  # so that the saved network can be rebuilt
    modules = [slim_module(clf, data, c, SlimSettings(size=0.5, samples=40, step=0.2)) for c in (0, 2)]
    merged = merge_slim(modules, clf, data, SlimSettings(samples=20, size=0.3))
    assert merged.params() <= 0.3 * sum(p.numel() for p in clf.net.parameters())
    x = images()
    with torch.no_grad():
        on_gpu = merged(x.cuda()).cpu()
    save_merged_slim(merged, clf, tmp_path / "merged")
    loaded, _ = load_merged_slim(tmp_path / "merged", "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(x), on_gpu, atol=1e-4)
    report = cost_report(merged, x.cuda(), source=clf)
    assert report["params_fraction"] == pytest.approx(merged.params() / sum(p.numel() for p in clf.net.parameters()),
                                                      abs=1e-4)
    assert report["latency_ms"] > 0 and report["model_latency_ms"] > 0 and report["flops_fraction"] < 1


def test_cli_trains_decomposes_and_evaluates_on_cuda(tmp_path, npz_data, capsys):
    rc, stdout, err = run(["train", "--arch", "resnet20", "--data", npz_data, "--epochs", "2", "--batch-size", "16",
                           "--device", "cuda", "--out", str(tmp_path / "m"), "--json"], capsys)
    assert rc == 0, err
    trained = json.loads(stdout)
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "node"), "--device", "cuda"], capsys)
    assert rc == 0, err
    rc, _, err = run(["decompose", str(tmp_path / "m"), "--out", str(tmp_path / "slim"), "--device", "cuda",
                      "--granularity", "channel", "--size", "0.5", "--set", "samples=30"], capsys)
    assert rc == 0, err
    reports = {}
    for device in ("cuda", "cpu"):
        rc, stdout, err = run(["evaluate", str(tmp_path / "node"), "--device", device, "--json", "--latency-batch",
                               "8"], capsys)
        assert rc == 0, err
        reports[device] = json.loads(stdout)
    # the same modules score the same test images alike on either device (a tie may flip one image)
    test_images = reports["cpu"]["test_images"]
    assert abs(reports["cuda"]["composed_top1"] - reports["cpu"]["composed_top1"]) <= 100.0 / test_images + 1e-9
    assert reports["cuda"]["model_top1"] == pytest.approx(reports["cpu"]["model_top1"], abs=100.0 / test_images)
    assert trained["test_top1"] == pytest.approx(reports["cpu"]["model_top1"], abs=100.0 / test_images)
    rc, stdout, err = run(["compose", str(tmp_path / "slim" / "modules" / "c00-band0"),
                           str(tmp_path / "slim" / "modules" / "c02-band2"), "--mode", "merged", "--device", "cuda",
                           "--out", str(tmp_path / "merged"), "--json"], capsys)
    assert rc == 0, err
    rc, stdout, err = run(["evaluate", str(tmp_path / "merged"), "--device", "cuda", "--json", "--latency-batch", "8"],
                          capsys)
    assert rc == 0, err
    assert json.loads(stdout)["mode"] == "merged"


def test_a_training_run_stopped_on_cuda_goes_on_to_the_weights_of_one_that_never_stopped(tmp_path, npz_data,
                                                                                         monkeypatch):
    s = TrainSettings(arch="resnet20", data=npz_data, epochs=3, batch_size=16, optimizer="sgd", lr=0.05, seed=3,
                      device="cuda")
    whole = train(s, tmp_path / "whole", show_progress=False)["model"].net.state_dict()
    stopped_training(s, tmp_path / "m", 1, monkeypatch)
    r = train(s, tmp_path / "m", show_progress=False, resume=True)
    assert r["resumed_after_epoch"] == 1 and len(r["history"]) == 3
    went_on = r["model"].net.state_dict()
    # CUDA's kernels need not be bit-reproducible; a run that lost its generators or optimizer state is far off
    for k, v in whole.items():
        if v.is_floating_point():
            assert float((went_on[k] - v).norm()) <= 1e-3 * float(v.norm()) + 1e-6, k
