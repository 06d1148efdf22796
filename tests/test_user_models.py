"""A user's own model: their architecture by reference, their preprocessing, their Dataset; saved and loaded
like the zoo's, and every mistake one line."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, random_data, run, write_cifar10
from safetensors.torch import save_file

import cnnmod
from cnnmod.data import load
from cnnmod.data.transforms import InputSpec, to_input
from cnnmod.models.reference import REGISTERED

USER_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def make(width=8, num_classes=10):
    return Net(num_classes, width)


NOT_CALLABLE = 3


def not_a_module(num_classes=10):
    return "a string"


def seven_outputs(num_classes=10):
    return Net(7)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``usernets``, the user's own module, importable from a folder of theirs."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "usernets.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("usernets", None)


def trained_weights(tmp_path: Path, width: int = 6) -> tuple[Path, torch.nn.Module]:
    """The user's training loop, their way: 3x16x16 inputs resized from digits' 8x8, ImageNet mean/std."""
    import usernets

    torch.manual_seed(0)
    net = usernets.Net(10, width, in_channels=3)
    train = load("digits", "train")
    spec = InputSpec(3, 16, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    opt = torch.optim.Adam(net.parameters(), 0.01)
    for _ in range(8):
        for i in range(0, len(train), 64):
            x, y = to_input(train.images[i:i + 64], spec), train.labels[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    path = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net.eval()


def their_top1(net: torch.nn.Module) -> float:
    """The user's own evaluation loop: resize each image to 16x16, RGB, normalise, argmax."""
    test = load("digits", "test")
    x = test.images.float().div(255).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = net((x - mean) / std).argmax(1)
    return 100.0 * float((pred == test.labels).float().mean())


def test_imported_by_reference_with_its_own_preprocessing_evaluates_as_its_users_loop(tmp_path, user_package,
                                                                                      capsys):
    weights, net = trained_weights(tmp_path)
    out = tmp_path / "m"
    rc, stdout, err = run(["import", "--arch", "usernets:Net", "--arch-arg", "width=6", "--arch-arg",
                           "in_channels=3", "--weights", str(weights), "--data", "digits", "--input-size", "16x16",
                           "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--out", str(out),
                           "--json"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == {"name": "usernets:Net", "args": {"width": 6, "in_channels": 3, "num_classes": 10}}
    assert config["input"]["height"] == 16 and config["input"]["mean"] == [0.485, 0.456, 0.406]
    expected = their_top1(net)
    assert expected > 50
    assert abs(result["test_top1"] - expected) < 1e-3  # rounded to 4 places; one image is 0.28
    # loading it imports the user's code: refused without trust, in one line that says how to allow it
    rc, stdout, err = run(["evaluate-model", str(out), "--json"], capsys)
    assert_user_error(rc, stdout, err, "usernets:Net", "--trust-code", "CNNMOD_TRUSTED_CODE=usernets")
    rc, stdout, err = run(["evaluate-model", str(out), "--trust-code", "--json"], capsys)
    assert rc == 0, err
    assert abs(json.loads(stdout)["top1"] - expected) < 1e-3
    with pytest.raises(cnnmod.UserError, match="trust_code=True"):
        cnnmod.load_model(out)
    assert cnnmod.load_model(out, trust_code=True).arch == "usernets:Net"
    # decomposed and reloaded, by the CLI and the API, once trusted
    rc, stdout, err = run(["decompose", str(out), "--out", str(tmp_path / "d"), "--set", "ci_samples=20",
                           "--set", "calibration_samples=0", "--trust-code", "--json"], capsys)
    assert rc == 0, err
    modules = cnnmod.load_modules(tmp_path / "d", trust_code=True)
    assert len(modules) == 10 and modules[0].spec.height == 16


def test_trusted_packages_from_the_environment(tmp_path, user_package, monkeypatch, capsys):
    weights, _ = trained_weights(tmp_path, width=4)
    out = tmp_path / "m"
    rc, _, err = run(["import", "--arch", "usernets:make", "--arch-arg", "width=4", "--weights", str(weights),
                      "--data", "digits", "--channels", "3", "--input-size", "16", "--out", str(out)], capsys)
    assert rc == 2 and "usernets:make" in err  # make() builds a 1-channel Net: its weights do not fit
    monkeypatch.setenv("CNNMOD_TRUSTED_CODE", "other,usernets")
    weights1 = tmp_path / "one.safetensors"
    import usernets
    save_file(usernets.make(4).state_dict(), str(weights1))
    rc, _, err = run(["import", "--arch", "usernets:make", "--arch-arg", "width=4", "--weights", str(weights1),
                      "--data", "digits", "--mean", "0", "--std", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    assert cnnmod.load_model(out).arch_args == {"width": 4, "num_classes": 10}


@pytest.mark.parametrize("arch,args,needles", [
    ("nosuchpackage.nets:Net", [], ["cannot import nosuchpackage.nets", "PYTHONPATH"]),
    ("usernets:Missing", [], ["usernets has no 'Missing'"]),
    ("usernets:NOT_CALLABLE", [], ["is a int, not a class or function"]),
    ("usernets:not_a_module", [], ["returned a str, not a torch.nn.Module"]),
    ("usernets:Net", ["depth=3"], ["takes no argument depth", "num_classes, width, in_channels"]),
    ("usernets:seven_outputs", [], ["returns (1, 7) for one image, not (1, 10)"]),
    ("usernets.Net", [], ["unknown architecture 'usernets.Net' (did you mean usernets:Net?)"]),
    ("usernets:Net", ["width=5"], ["conv.weight is (6, 1, 3, 3) but usernets:Net needs (5, 1, 3, 3)"]),
])
def test_bad_architecture_references_are_one_line(tmp_path, user_package, capsys, arch, args, needles):
    import usernets
    weights = tmp_path / "w.safetensors"
    save_file(usernets.Net(10, 6).state_dict(), str(weights))
    argv = ["import", "--arch", arch, "--weights", str(weights), "--data", "digits", "--mean", "0", "--std", "1",
            "--out", str(tmp_path / "m")]
    for a in args:
        argv += ["--arch-arg", a]
    rc, stdout, err = run(argv, capsys)
    assert_user_error(rc, stdout, err, *needles)
    assert not (tmp_path / "m").exists()


def test_a_malformed_config_is_one_line(tmp_path, capsys):
    rc, _, err = run(["train", "--arch", "cnn", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "m")],
                     capsys)
    assert rc == 0, err
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    for arch in ("cnn", ["cnn"], {"args": {}}, {"name": "cnn", "args": [1]}):
        config["arch"] = arch
        config_path.write_text(json.dumps(config))
        rc, stdout, err = run(["evaluate-model", str(tmp_path / "m")], capsys)
        assert_user_error(rc, stdout, err, "config.json is malformed: 'arch' must be an object")
    config["arch"], config["input"] = {"name": "cnn", "args": {}}, {"channels": 1}
    config_path.write_text(json.dumps(config))
    rc, stdout, err = run(["evaluate-model", str(tmp_path / "m")], capsys)
    assert_user_error(rc, stdout, err, "config.json is malformed: 'input'")


def test_a_plain_module_is_saved_only_when_it_can_be_reloaded(tmp_path, user_package):
    import usernets
    data = random_data((1, 12, 12), 4, 6)
    torch.manual_seed(0)
    net = usernets.Net(4, 5).eval()
    settings = cnnmod.DecomposeSettings(calibration_samples=0)
    modules = cnnmod.decompose(cnnmod.wrap(net, data=data, mean=data.mean, std=data.std), data, recipe=settings)
    with pytest.raises(cnnmod.UserError, match=r"records no architecture.*cnnmod.wrap\(model, arch="):
        cnnmod.save_decomposition(modules, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    clf = cnnmod.wrap(net, data=data, mean=0, std=1, arch="usernets:Net", arch_args={"width": 5})
    assert clf.arch_args == {"width": 5, "num_classes": 4, "in_channels": 1}
    modules = cnnmod.decompose(clf, data, recipe=settings)
    cnnmod.save_decomposition(modules, tmp_path / "d")
    loaded = cnnmod.load_modules(tmp_path / "d", trust_code=True)
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(loaded[2](x), modules[2](x), atol=1e-5)
    with pytest.raises(cnnmod.UserError, match="usernets:Net needs"):  # the wrong arguments for these weights
        cnnmod.wrap(net, data=data, mean=0, std=1, arch="usernets:Net", arch_args={"width": 3})


def test_a_registered_class_records_its_own_arguments(tmp_path):
    @cnnmod.register_arch("tiny_registered")
    class Tiny(torch.nn.Module):
        def __init__(self, num_classes=4, width=3):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, width, 3), torch.nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    try:
        data = random_data((1, 12, 12), 4, 6)
        net = Tiny(width=5).eval()
        model = cnnmod.wrap(net, data=data, mean=data.mean, std=data.std)
        modules = cnnmod.decompose(model, data, recipe=cnnmod.DecomposeSettings(calibration_samples=0))
        cnnmod.save_decomposition(modules, tmp_path / "d")
        config = json.loads((tmp_path / "d" / "model" / "config.json").read_text())
        assert config["arch"]["args"] == {"num_classes": 4, "width": 5}
        assert config["arch"]["name"].endswith(":test_a_registered_class_records_its_own_arguments.<locals>.Tiny")
        # registered in this process: its code is already the user's, so no trust is asked
        assert cnnmod.load_modules(tmp_path / "d")[0].source.net.conv.out_channels == 5
    finally:
        REGISTERED.pop("tiny_registered")


class PairsDataset(torch.utils.data.Dataset):
    """A user's Dataset: float images in [0, 1] (as ToTensor gives), int labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, bad: int | None = None) -> None:
        self.images, self.labels, self.bad = images, labels, bad
        self.classes = [f"r{c}" for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if i == self.bad:
            return self.images[i]
        return self.images[i].float() / 255, int(self.labels[i])


def test_a_torch_dataset_decomposes_as_the_same_images_do():
    data = random_data((1, 12, 12), 4, 6)
    ds = PairsDataset(data.images, data.labels)
    as_set = cnnmod.from_dataset(ds)
    assert torch.equal(as_set.images, data.images) and as_set.class_names == data.class_names
    torch.manual_seed(0)
    net = cnnmod.models.build("cnn", (1, 12, 12), 4).eval()
    spec = InputSpec(1, 12, 12, (0.5,), (0.25,))
    clf = cnnmod.wrap(net, spec=spec, class_names=data.class_names, arch="cnn")
    settings = cnnmod.DecomposeSettings(calibration_samples=0)
    from_ds = cnnmod.decompose(clf, ds, recipe=settings)
    from_set = cnnmod.decompose(clf, data, recipe=settings)
    assert all(torch.equal(a.flat_mask(), b.flat_mask()) for a, b in zip(from_ds, from_set, strict=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    assert torch.equal(cnnmod.from_dataset(loader, data.class_names).images, data.images)
    with pytest.raises(cnnmod.UserError, match=r"item 3 of the Dataset is a Tensor, not an \(image, label\) pair"):
        cnnmod.from_dataset(PairsDataset(data.images, data.labels, bad=3))
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long))
    with pytest.raises(cnnmod.UserError, match="the Dataset is empty"):
        cnnmod.decompose(clf, empty, recipe=settings)


def test_center_crop_fits_images_as_imagenet_evaluation_does():
    images = torch.arange(4 * 8, dtype=torch.uint8).view(1, 1, 4, 8)
    spec = InputSpec(1, 4, 4, (0.0,), (1.0,), fit="center-crop", crop=1.0)
    # the shorter side is already 4: no resize, the centre four columns cut out
    assert torch.allclose(to_input(images, spec) * 255, images[..., 2:6].float(), atol=1e-4)
    resized = InputSpec(1, 4, 4, (0.0,), (1.0,))
    assert to_input(images, resized).shape == (1, 1, 4, 4)
    assert not torch.allclose(to_input(images, resized), to_input(images, spec))
    with pytest.raises(ValueError, match="fit must be one of"):
        InputSpec(1, 4, 4, (0.0,), (1.0,), fit="stretch")


def test_a_torchvision_resnet50_checkpoint_imports_and_decomposes(tmp_path, capsys):
    """A .pth in torchvision's layout (its key names: tests/test_models.py checks them against torchvision) goes
    in as it is, with ImageNet preprocessing (center crop to 64, ImageNet mean/std), and decomposes."""
    write_cifar10(tmp_path / "data", per_batch=12)
    torch.manual_seed(0)
    net = cnnmod.models.build("resnet50", (3, 64, 64), 10).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "r50.pth")
    out = tmp_path / "m"
    rc, stdout, err = run(["import", "--arch", "resnet50", "--weights", str(tmp_path / "r50.pth"), "--data",
                           "cifar10", "--data-root", str(tmp_path / "data"), "--input-size", "64", "--fit",
                           "center-crop", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--out",
                           str(out), "--json"], capsys)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["input"]["fit"] == "center-crop" and config["input"]["height"] == 64
    clf = cnnmod.load_model(out)  # a zoo name: no trust asked
    test = load("cifar10", "test", tmp_path / "data")
    spec = InputSpec(3, 64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), fit="center-crop")
    with torch.no_grad():
        expected = 100.0 * float((net(to_input(test.images, spec)).argmax(1) == test.labels).float().mean())
    assert abs(json.loads(stdout)["test_top1"] - expected) < 1e-3
    assert torch.equal(clf.prepare(test.images[:2]), to_input(test.images[:2], spec))
    rc, stdout, err = run(["decompose", str(out), "--out", str(tmp_path / "d"), "--data-root", str(tmp_path / "data"),
                           "--set", "ci_samples=2", "--set", "calibration_samples=0", "--json"], capsys)
    assert rc == 0, err
    rc, stdout, err = run(["import", "--arch", "densenet121", "--weights", str(tmp_path / "r50.pth"), "--data",
                           "cifar10", "--data-root", str(tmp_path / "data"), "--input-size", "16", "--mean", "0",
                           "--std", "1", "--out",
                           str(tmp_path / "s")], capsys)  # four stride-2 stages: 16 pixels pool down to nothing
    assert_user_error(rc, stdout, err, "densenet121 fails on a 3x16x16 input", "check the input size")


def test_a_model_that_fails_on_the_datas_size_is_one_line():
    net = cnnmod.models.build("densenet121", (3, 64, 64), 4).eval()
    with pytest.raises(cnnmod.UserError, match=r"DenseNet121 fails on a 3x8x8 input \(RuntimeError: .*too small\); "
                                               "check the input size"):
        cnnmod.decompose(net, random_data((3, 8, 8), 4, 3))
