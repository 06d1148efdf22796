"""The model zoo: shapes, traceability, torchvision-compatible names, BatchNorm switch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.fx
from fixtures.make_torchvision_fixture import fill
from torch import nn

from cnnmod.errors import UserError
from cnnmod.models import ARCHITECTURES, build


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_model_runs_and_traces(name: str) -> None:
    imagenet = name in ("resnet50", "mobilenet_v2", "vgg16_bn", "densenet121")
    # the transformers at small sizes: 4x4 patches (ViT), a 2x2 stem (ConvNeXt), as Fashion-MNIST takes them
    args = {"patch": 4, "depth": 2} if name.startswith("vit") else {"patch": 2} if name.startswith("convnext") else {}
    for shape in ((1, 32, 32), (3, 64, 64)) if imagenet else ((1, 28, 28), (3, 32, 32)):
        model = build(name, shape, 7, **args).eval()
        x = torch.randn(2, *shape)
        traced = torch.fx.symbolic_trace(model)
        assert torch.allclose(traced(x), model(x), atol=1e-5)
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("depth,blocks", [(20, 3), (32, 5), (56, 9)])
def test_cifar_resnet_structure(depth: int, blocks: int) -> None:
    model = build(f"resnet{depth}", (3, 32, 32), 10, bn=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # stem + 2 per block + two 1x1 projection shortcuts
    assert len(convs) == 1 + 2 * 3 * blocks + 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(c.bias is not None for c in convs)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    with_bn = build(f"resnet{depth}", (3, 32, 32), 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == len(convs)


def test_resnet18_uses_torchvision_names() -> None:
    keys = set(build("resnet18", (3, 224, 224), 1000).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.num_batches_tracked",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight",
              "fc.weight", "fc.bias"):
        assert k in keys
    assert "layer1.0.downsample.0.weight" not in keys
    n = sum(p.numel() for p in build("resnet18", (3, 224, 224), 1000).parameters())
    assert n == 11_689_512  # torchvision's resnet18 parameter count
    n34 = sum(p.numel() for p in build("resnet34", (3, 224, 224), 1000).parameters())
    assert n34 == 21_797_672


def test_mlp_hidden_layers() -> None:
    model = build("mlp", (1, 28, 28), 10, hidden=[49, 49, 49])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 49), (49, 49), (49, 49), (49, 10)]


def test_registry_errors() -> None:
    with pytest.raises(UserError, match="unknown architecture 'resnet21'"):
        build("resnet21", (3, 32, 32), 10)
    with pytest.raises(UserError, match="takes no option depth"):
        build("resnet20", (3, 32, 32), 10, depth=3)
    with pytest.raises(UserError, match="at least 2 classes"):
        build("cnn", (1, 8, 8), 1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn", "densenet121"])
def test_imagenet_zoo_has_torchvisions_keys_shapes_and_outputs(name):
    """Against torchvision 0.28.0 itself (recorded once in a throwaway venv: torchvision is never a dependency):
    every state-dict key in order with its shape, and the logits under the same deterministic weights."""
    fixture = json.loads((Path(__file__).parent / "fixtures" / "torchvision_0.28.0.json").read_text())["models"][name]
    net = build(name, (3, 64, 64), 10).eval()
    state = net.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == fixture["keys"]
    net.load_state_dict(fill(state))  # the weights the fixture's torchvision models had
    x = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.11).reshape(2, 3, 64, 64).float()
    with torch.no_grad():
        logits = net(x)
    expected = torch.tensor(fixture["logits"])
    assert torch.allclose(logits, expected, atol=1e-3 * (1 + float(expected.abs().max())))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        thousand = build(name, (3, 64, 64), 1000)
    assert [list(v.shape) for v in thousand.state_dict().values()][-2:] == fixture["fc_1000"]
    del net, state


def test_top1_top5_and_per_class_accuracy_counted_by_hand() -> None:
    """12 classes, distinct random scores: top-k counted by sorting each row, per-class top-1 by counting."""
    from cnnmod.core.metrics import accuracy_report

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 12, generator=g)
    labels = torch.randint(0, 12, (200,), generator=g)
    rows, truth = scores.tolist(), labels.tolist()
    ranked = [sorted(range(12), key=lambda j, r=r: -r[j]) for r in rows]
    top = {k: 100.0 * sum(t in order[:k] for order, t in zip(ranked, truth, strict=True)) / 200 for k in (1, 5)}
    report = accuracy_report(scores, labels, [f"c{c}" for c in range(12)])
    assert (report["top1"], report["top5"], report["count"]) == (pytest.approx(top[1], abs=1e-4),
                                                                 pytest.approx(top[5], abs=1e-4), 200)
    for c, row in enumerate(report["per_class"]):
        mine = [order[0] == t for order, t in zip(ranked, truth, strict=True) if t == c]
        assert row["count"] == len(mine) and row["top1"] == pytest.approx(100.0 * sum(mine) / len(mine), abs=1e-4)


TIMM = {"vit_tiny_p4_32": ("vit_tiny", {"patch": 4}), "vit_small_p4_28_gray": ("vit_small", {"patch": 4}),
        "convnext_atto": ("convnext_atto", {}), "convnext_tiny": ("convnext_tiny", {})}


@pytest.mark.parametrize("fixture_name", list(TIMM))
def test_transformer_zoo_has_timms_keys_shapes_and_outputs(fixture_name):
    """Against timm 1.0.31 itself (tests/fixtures/make_timm_fixture.py, run once without timm's dependencies):
    every state-dict key in order with its shape, the 1000-class head's, and the logits under the same
    deterministic weights, for ViTs at other patch and image sizes than timm's defaults."""
    fixture = json.loads((Path(__file__).parent / "fixtures" / "timm_1.0.31.json").read_text())["models"][fixture_name]
    name, args = TIMM[fixture_name]
    shape = tuple(fixture["input_shape"])
    net = build(name, shape, 10, **args).eval()
    state = net.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == fixture["keys"]
    net.load_state_dict(fill(state))
    x = torch.sin(torch.arange(2 * math.prod(shape), dtype=torch.float64) * 0.11).reshape(2, *shape).float()
    with torch.no_grad():
        logits = net(x)
    expected = torch.tensor(fixture["logits"])
    assert torch.allclose(logits, expected, atol=1e-3 * (1 + float(expected.abs().max())))
    with torch.device("meta"):
        thousand = build(name, shape, 1000, **args)
    assert [list(v.shape) for v in thousand.state_dict().values()][-2:] == fixture["head_1000"]


def test_transformer_zoo_refuses_sizes_it_cannot_cut_in_one_line():
    with pytest.raises(UserError, match=r"28x28 images into 16x16 patches: give patch=N .*patch=4 for 28x28"):
        build("vit_tiny", (1, 28, 28), 10)
    with pytest.raises(UserError, match=r"too small for patch=4 \(give --arch-arg patch=2 for 28x28\)"):
        build("convnext_atto", (1, 28, 28), 10)
