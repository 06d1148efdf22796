"""A new kind of module is one registration: a toy kind, written here against the contract and the table of
kinds only, goes through the command line (decompose -> compose -> save -> load -> evaluate) as the built-in
kinds do, and its scores are what a hand computation from the model says."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import pytest
import torch
from conftest import run, train_small_cnn
from torch import nn

import cnnmod
from cnnmod.artifacts import write_into
from cnnmod.core.graph import ModelGraph
from cnnmod.core.masking import binary_head
from cnnmod.data.transforms import InputSpec
from cnnmod.models.registry import build
from cnnmod.modules.base import BinaryModule, ModuleRecord
from cnnmod.modules.kinds import MODULE_KINDS, ModuleKind, kinds, register_module_kind


@dataclass(frozen=True)
class MarginSettings:
    seed: int = 0

    def check(self) -> None:
        pass


class MarginModule(BinaryModule):
    """The whole model with its classifier replaced by the paper's binary head: z_c and the mean of the others."""

    granularity = "margin"

    def __init__(self, net: nn.Module, head: str, spec: InputSpec, concerned: int, info: dict,
                 record: ModuleRecord | None = None) -> None:
        super().__init__()
        self.net, self.head_name, self._spec, self.concerned, self.info = net, head, spec, concerned, dict(info)
        (record or ModuleRecord()).apply(self)

    class_name = property(lambda self: self.info["class_names"][self.concerned])
    source_class = property(lambda self: self.concerned)
    dataset = property(lambda self: self.info["dataset"])
    spec = property(lambda self: self._spec)
    source_key = property(lambda self: id(self))
    source_sha = property(lambda self: self.info["sha"])
    source_model = property(lambda self: None)
    points = property(lambda self: [])
    head_weight = property(lambda self: self.net.get_submodule(self.head_name).weight)
    head_bias = property(lambda self: self.net.get_submodule(self.head_name).bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def batched_features(cls, modules: Sequence[MarginModule], x: torch.Tensor, union: bool,
                         pooled: list | None = None) -> torch.Tensor:
        (m,) = modules
        seen = []
        hook = m.net.get_submodule(m.head_name).register_forward_pre_hook(lambda _m, i: seen.append(i[0]))
        try:
            m.net(x)
        finally:
            hook.remove()
        return seen[0].flatten(1)[None]

    def kept_fraction(self) -> float:
        return 1.0

    def shared_params(self) -> int:
        return 0

    def own_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def with_head(self, weight, bias, settings) -> MarginModule:
        out = copy.deepcopy(self)
        out.net.get_submodule(self.head_name).weight.data.copy_(weight)
        out.net.get_submodule(self.head_name).bias.data.copy_(bias)
        out.settings = dict(settings)
        return out


def make(model, data, settings, classes, passes, clock, calibration_samples=None) -> list[MarginModule]:
    head = ModelGraph(model.net, model.spec.shape).head.layer
    info = {"arch": model.arch, "arch_args": model.arch_args, "dataset": model.dataset,
            "class_names": model.class_names, "sha": model.info.get("weights_sha256")}
    modules = []
    with clock("decomposition"):
        for c in classes:
            net = copy.deepcopy(model.net).eval()
            layer = net.get_submodule(head)
            w, b = binary_head(layer.weight, layer.bias, c)
            two = nn.Linear(layer.in_features, 2)
            two.weight.data.copy_(w)
            two.bias.data.copy_(b)
            net.set_submodule(head, two)
            modules.append(MarginModule(net, head, model.spec, c, info, ModuleRecord(asdict(settings))))
    return modules


def write(folder, m: MarginModule, source_rel, source_sha) -> dict:
    config = {"granularity": "margin", "concerned_class": m.concerned, "class_name": m.class_name,
              "source_class": m.concerned, "dataset": m.dataset, "input": m.spec.to_dict(), "head": m.head_name,
              "info": m.info, "settings": m.settings, "metrics": m.metrics, "calibration": m.calibration}
    return write_into(folder, "module", config, m.net.state_dict(), f"# margin module of {m.class_name}\n")


def load(folder, config, tensors, device, sources) -> MarginModule:
    spec = InputSpec.from_dict(config["input"])
    info = config["info"]
    net = build(info["arch"], spec.shape, len(info["class_names"]), **info["arch_args"])
    net.set_submodule(config["head"], nn.Linear(net.get_submodule(config["head"]).in_features, 2))
    net.load_state_dict(tensors)
    record = ModuleRecord(config["settings"], config["metrics"], config["calibration"])
    return MarginModule(net.eval(), config["head"], spec, config["concerned_class"], info, record).to(device)


@pytest.fixture
def margin_kind():
    kinds()  # the built-in kinds first, as a user's package would find them
    kind = register_module_kind(ModuleKind(
        "margin", "margin modules", MarginSettings, lambda name, **given: replace(MarginSettings(), **{
            k: v for k, v in given.items() if k in ("seed",)}), ("best",), make,
        lambda model, s, data, processes: f"margin modules of {model.arch}", write, load))
    yield kind
    del MODULE_KINDS["margin"]


def test_a_kind_registered_from_outside_goes_through_the_command_line(margin_kind, tmp_path, npz_data, capsys):
    train_small_cnn(tmp_path / "m", npz_data, capsys, epochs=1)
    rc, out, err = run(["decompose", str(tmp_path / "m"), "--granularity", "margin", "--out", str(tmp_path / "d"),
                        "--json"], capsys)
    assert rc == 0, err
    made = json.loads(out)
    assert made["variant"] == "margin" and [e["class"] for e in made["modules"]] == [0, 1, 2]
    assert "margin modules of cnn" in err
    rc, out, err = run(["compose", f"{tmp_path / 'd'}:0,2", "--out", str(tmp_path / "c"), "--json"], capsys)
    assert rc == 0, err
    composed = json.loads(out)
    assert composed["mode"] == "vote" and composed["calibration"] == "none"  # the kind composes nothing else
    loaded = cnnmod.load_modules(tmp_path / "c")
    assert [type(m) for m in loaded] == [MarginModule, MarginModule] and [m.concerned for m in loaded] == [0, 2]

    # each module's score, by hand from the model: sigmoid(z_c - mean of the other logits)
    model = cnnmod.load_model(tmp_path / "m")
    images = torch.randint(0, 256, (5, *model.spec.shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.net(model.prepare(images))
        expected = torch.stack([torch.sigmoid(z[:, c] - (z.sum(1) - z[:, c]) / 2) for c in (0, 2)], 1)
        scores = cnnmod.compose(loaded)(images)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)

    rc, out, err = run(["evaluate", str(tmp_path / "c"), "--no-cost", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["modules"] == 2
    rc, out, err = run(["compose", str(tmp_path / "d"), "--mode", "merged", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "«mode» merged" not in err and "--mode merged composes" in err, err
