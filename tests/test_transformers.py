"""Modules of transformers: attention in the layouts users write, read in one canonical form; heads and MLP hidden
units cut; the errors a network the slicer cannot follow gets. (The families of tests/families.py, vit_timm,
vit_hf, vit_mha and convnext, run every slim capability in tests/test_families.py.)"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_user_error, random_data, run
from families import HFSelfAttention, SmallViT, TimmAttention
from torch import nn

import cnnmod
from cnnmod.core.attention import HeadAttention, canonical, kept_whole, to_canonical
from cnnmod.data.transforms import InputSpec
from cnnmod.models.classifier import Classifier
from cnnmod.models.folder import save_into
from cnnmod.slim.channels import frozen_copy

SHAPE = (1, 16, 16)


def tokens(n: int = 3, length: int = 7, dim: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, length, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["timm", "hf", "mha", "mha-seq-first"])
def test_every_attention_layout_converts_to_what_it_computes(layout):
    """On tokens it was not checked on: the canonical form returns what the user's layer returns, in its shape."""
    torch.manual_seed(0)
    if layout == "timm":
        layer = TimmAttention(32, 4)
    elif layout == "hf":
        layer = HFSelfAttention(32, 4)
    else:
        layer = nn.MultiheadAttention(32, 4, batch_first=layout == "mha")
    layer.eval()
    ours = to_canonical(layer, "attn").eval()
    assert isinstance(ours, HeadAttention) and ours.num_heads == 4 and ours.head_dim == 8
    x = tokens()
    with torch.no_grad():
        if layout.startswith("mha"):
            theirs, _ = layer(x, x, x, need_weights=False)
            mine, none = ours(x, x, x, need_weights=False)
            assert none is None
        elif layout == "hf":
            (theirs,), (mine,) = layer(x), ours(x)
        else:
            theirs, mine = layer(x), ours(x)
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_cutting_heads_leaves_the_kept_heads_terms_computed_by_hand():
    """softmax(q_h k_h^T / sqrt(d)) v_h, each kept head's block of the projection's columns, the bias once: written
    out head by head here, against a layer with head 1 of 3 cut."""
    torch.manual_seed(0)
    attn = HeadAttention(12, 3, 4).eval()
    x = tokens(2, 5, 12)
    w_qkv, b_qkv = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    w_p, b_p = attn.proj.weight.detach(), attn.proj.bias.detach()
    expected = b_p.expand(2, 5, 12).clone()
    for h in (0, 2):
        q, k, v = (x @ w_qkv[part * 12 + 4 * h:part * 12 + 4 * h + 4].T + b_qkv[part * 12 + 4 * h:part * 12 + 4 * h + 4]
                   for part in range(3))
        weights = torch.exp(q @ k.transpose(1, 2) / 2.0)
        head = (weights / weights.sum(-1, keepdim=True)) @ v
        expected += head @ w_p[:, 4 * h:4 * h + 4].T
    attn.keep_heads(torch.tensor([0, 2]))
    assert attn.num_heads == 2 and attn.qkv.out_features == 24 and attn.proj.in_features == 8
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)


class Unlabelled(TimmAttention):
    """timm's layout with the head count kept under a name cnnmod does not know."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self._h = self.num_heads
        del self.num_heads

    def forward(self, x):
        self.num_heads = self._h
        try:
            return super().forward(x)
        finally:
            del self.num_heads


class QKNorm(TimmAttention):
    """Normalised queries and keys: not softmax(q k^T / sqrt(d)) v."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        return self.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


def vit_with(attention: type, dim: int = 32, heads: int = 4) -> nn.Module:
    net = SmallViT(1, 4, dim // 4)
    for block in net.blocks:
        block.attn = attention(dim, heads)
    return net.eval()


def test_a_head_count_the_layer_does_not_record_is_read_off_its_outputs_or_given():
    net = vit_with(Unlabelled)
    graph, frozen, groups = frozen_copy(net, SHAPE)
    assert [(g.root, g.channels) for g in groups.groups if g.unit == "heads"] == \
        [("blocks.0.attn", 4), ("blocks.1.attn", 4)]
    tiny = vit_with(Unlabelled, dim=8, heads=4)  # heads of 2 features: too narrow to be read off
    unread = canonical(copy.deepcopy(tiny), None, SHAPE)
    assert re.search(r"cannot read the head count of the attention layer 'blocks.0.attn' .*give it: "
                     r"--set heads=blocks.0.attn=N", kept_whole(unread)["blocks.0.attn"])
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        before = tiny(x)
        given = canonical(tiny, {"blocks.0.attn": 4, "blocks.1.attn": 4}, SHAPE)
        assert given.blocks[1].attn.num_heads == 4
        assert torch.allclose(given(x), before, atol=1e-5)


@cnnmod.register_arch("qknorm_vit")
def qknorm_vit(in_channels: int = 1, num_classes: int = 4) -> nn.Module:
    """A ViT whose attention normalises queries and keys, besides a plain one (its second block's)."""
    net = vit_with(QKNorm)
    net.blocks[1].attn = TimmAttention(32, 4)
    return net


def test_attention_the_slicer_cannot_follow_is_kept_whole_and_the_rest_is_cut(tmp_path):
    """Its heads all stay, the other layer's heads and the MLPs are cut; the card says which layer and why; the
    folder reloads to the same outputs."""
    torch.manual_seed(0)
    net = qknorm_vit().eval()
    clf = Classifier(net, InputSpec(*SHAPE, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "qknorm_vit", {}, "rand")
    data = random_data(SHAPE, 4, 8)
    modules = cnnmod.decompose(clf, data, granularity="channel", classes=[0, 1], size=0.5, samples=8)
    for m in modules:
        assert set(m.metrics["whole"]) == {"blocks.0.attn"}
        assert "blocks.0.attn" not in m.removed and "blocks.1.attn" in m.removed
        assert isinstance(m.net.blocks[0].attn, QKNorm) and isinstance(m.net.blocks[1].attn, HeadAttention)
    assert sum(m.params() for m in modules) <= 0.5 * len(modules) * clf.params()  # half, on average
    cnnmod.save_decomposition(modules, tmp_path / "d")
    card = next((tmp_path / "d" / "modules").iterdir()).joinpath("README.md").read_text()
    assert "kept whole (1 layer" in card and "blocks.0.attn" in card and "something besides" in card
    loaded = cnnmod.load_modules(tmp_path / "d")
    images = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(modules, loaded, strict=True):
            assert torch.equal(a(a.prepare(images)), b(b.prepare(images)))
    merged = cnnmod.compose(modules, mode="merged")
    assert set(merged.metrics["whole"]) == {"blocks.0.attn"}


def test_attention_called_with_more_than_its_tokens_is_kept_whole():
    """A position embedding passed in (rotary embeddings, as EVA passes them) is more than the canonical form
    computes with: the layer stays as it is."""

    class WithRope(TimmAttention):
        def forward(self, x, rope=None):
            return super().forward(x if rope is None else x + rope)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.fc = nn.Linear(16, 32), WithRope(32, 4), nn.Linear(32, 4)
            self.register_buffer("rope", torch.randn(16, 32))

        def forward(self, x):
            t = self.embed(x[:, 0])  # 16 tokens of 16 pixels
            return self.fc(self.attn(t, rope=self.rope).mean(1))

    net = canonical(Net().eval(), None, SHAPE)
    assert isinstance(net.attn, WithRope)
    assert "more than its tokens" in kept_whole(net)["attn"]


def vit_classifier(attention: str = "timm") -> Classifier:
    torch.manual_seed(0)
    net = SmallViT(1, 4, 8, attention).eval()
    with torch.no_grad():
        net.fc.weight.normal_(0, 1)
    return Classifier(net, InputSpec(*SHAPE, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "x", {}, "rand")


def test_a_merged_transformer_composition_keeps_the_union_of_its_modules_heads_and_units():
    clf = vit_classifier("mha")
    data = random_data(SHAPE, 4, 8)
    modules = cnnmod.decompose(clf, data, granularity="channel", size=0.5, samples=8)
    assert sum(m.params() for m in modules) <= 0.5 * len(modules) * clf.params()  # half, on average
    assert all(m.params() < clf.params() for m in modules)
    merged = cnnmod.compose(modules[:2], mode="merged", model=clf, data=data)
    roots = {r for m in modules for r in m.removed}
    assert any(r.endswith(".attn.mha") for r in roots) and any(r.endswith(".mlp.0") for r in roots)
    for root in roots:  # closed in the merged network only where both modules closed it
        both = set(modules[0].removed.get(root, [])) & set(modules[1].removed.get(root, []))
        assert set(merged.removed.get(root, [])) == both, root
    images = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    with torch.no_grad():
        assert merged(images).shape == (3, 2)


def test_node_level_decomposition_of_a_gelu_transformer_and_a_bad_head_setting_are_one_line(tmp_path, capsys):
    clf = vit_classifier()
    clf.arch, clf.arch_args = "families:vit_timm", {"in_channels": 1, "num_classes": 4, "width": 8}
    save_into(clf, tmp_path / "vit")
    images = random_data(SHAPE, 4, 6)
    np.savez(tmp_path / "d.npz", x_train=images.images[:, 0].numpy(), y_train=images.labels.numpy(),
             x_test=images.images[:, 0].numpy(), y_test=images.labels.numpy())
    common = [str(tmp_path / "vit"), "--data", f"npz:{tmp_path / 'd.npz'}", "--trust-code"]
    rc, out, err = run(["decompose", *common, "--granularity", "node", "--out", str(tmp_path / "n")], capsys)
    assert_user_error(rc, out, err, "GELU", "needs ReLU-family", "--granularity channel")
    rc, out, err = run(["decompose", *common, "--set", "heads=blocks.0.attn=four", "--out", str(tmp_path / "c")],
                       capsys)
    assert_user_error(rc, out, err, "heads", "layer=N")
    assert not (tmp_path / "n").exists() and not (tmp_path / "c").exists()
    rc, out, err = run(["decompose", *common, "--size", "0.5", "--set", "samples=6", "--json", "--out",
                        str(tmp_path / "ok")], capsys)
    assert rc == 0, err
    fractions = [m["params_fraction"] for m in json.loads(out)["modules"]]
    assert len(fractions) == 4 and sum(fractions) <= 0.5 * 4
    # no granularity given: the model's GELU makes them slim modules, and the command says why
    rc, out, err = run(["decompose", *common, "--classes", "1", "--out", str(tmp_path / "a")],
                       capsys)
    assert rc == 0 and "node-level modules cannot be made of this model, so slim modules" in err, err
    assert "needs ReLU-family" in err
    assert (tmp_path / "a" / "modules").exists()
    assert json.loads(next((tmp_path / "a" / "modules").iterdir()).joinpath("config.json").read_text())[
        "granularity"] == "channel"


def test_attention_run_on_windows_of_each_input_is_cut():
    """Attention over windows (Swin's, DaViT's: each input's tokens split into windows, the batch multiplied):
    the per-input gates that rank heads (Fisher importance) follow each input's windows."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.fc = nn.Linear(16, 32), TimmAttention(32, 4), nn.Linear(32, 4)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

        def forward(self, x):
            t = self.embed(x[:, 0])  # 16 tokens of 16 pixels
            b = t.shape[0]
            t = t + self.attn(t.reshape(b * 4, 4, 32)).reshape(b, 16, 32)  # four windows of four tokens each
            t = t + self.mlp(t)
            return self.fc(t.mean(1))

    torch.manual_seed(0)
    clf = Classifier(Windowed().eval(), InputSpec(*SHAPE, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "x", {},
                     "rand")
    made = cnnmod.decompose(clf, random_data(SHAPE, 4, 8), granularity="channel", classes=[0, 1], size=0.5,
                            samples=8, calibration_samples=0)
    assert made[0].settings["rule"] == "fisher" and all(m.params() < clf.params() for m in made)
    assert {"attn", "mlp.0"} & set(made[0].removed)


def test_attention_over_a_map_rather_than_tokens_is_kept_whole():
    """torchvision's Swin attention reads (B, H, W, C): not tokens the canonical form reads; kept whole."""

    class MapAttention(TimmAttention):
        def forward(self, x):
            b, h, w, c = x.shape
            return super().forward(x.reshape(b, h * w, c)).reshape(b, h, w, c)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.fc = nn.Conv2d(1, 32, 4, 4), MapAttention(32, 4), nn.Linear(32, 4)

        def forward(self, x):
            t = self.embed(x).permute(0, 2, 3, 1)
            return self.fc(self.attn(t).mean((1, 2)))

    net = canonical(Net().eval(), None, SHAPE)
    assert isinstance(net.attn, MapAttention) and "not (tokens, features)" in kept_whole(net)["attn"]


def test_logits_combined_from_several_linear_heads_are_read_as_one_linear_head(capsys):
    """DeiT's distilled ViT ends in (fc(x_cls) + head_dist(x_dist)) / 2: its canonical form ends in one linear
    layer whose weight is [W_fc / 2, W_dist / 2] and bias the mean, giving the network's logits; slim modules and a
    merged composition are made of it; node-level modules are refused in one line that points to slim. Heads
    weighted by a learned softmax and summed (EfficientViM) are one head too, weighted so; a combination that is not
    affine (their maximum) is left as it is."""
    from families import DistilledViT

    from cnnmod.core.averaged_heads import LAYER, one_head
    from cnnmod.core.graph import ModelGraph

    torch.manual_seed(0)
    net = DistilledViT(1, 4, 8).eval()
    one = one_head(copy.deepcopy(net), SHAPE)
    layer = one.get_submodule(LAYER)
    assert torch.allclose(layer.weight, torch.cat([net.fc.weight / 2, net.head_dist.weight / 2], 1), atol=1e-7)
    assert torch.allclose(layer.bias, (net.fc.bias + net.head_dist.bias) / 2, atol=1e-7)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(one(x), net(x), atol=1e-6)
    assert ModelGraph(one, SHAPE).classifier == LAYER
    clf = Classifier(net, InputSpec(*SHAPE, (0.5,), (0.25,)), [f"r{c}" for c in range(4)], "distilled", {}, "rand")
    data = random_data(SHAPE, 4, 8)
    modules = cnnmod.decompose(clf, data, granularity="channel", classes=[0, 1], size=0.5, samples=8)
    assert all(m.params() < clf.params() for m in modules)
    assert cnnmod.compose(modules, mode="merged").params() < clf.params()
    with pytest.raises(cnnmod.UserError, match=r"combines several linear heads .* granularity channel"):
        cnnmod.decompose(clf, data)

    class Weighted(DistilledViT):
        def __init__(self, *a):
            super().__init__(*a)
            self.weights = nn.Parameter(torch.tensor([0.3, -0.2]))

        def forward(self, x):
            x = self.norm(self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), self.dist.expand(
                x.shape[0], -1, -1), self.patch(x).flatten(2).transpose(1, 2)], 1) + self.pos))
            w = self.weights.softmax(-1)
            return torch.stack([w[0] * self.fc(x[:, 0]), w[1] * self.head_dist(x[:, 1])]).sum(0)

    weighted = Weighted(1, 4, 8).eval()
    w = weighted.weights.softmax(-1).detach()
    layer = one_head(weighted, SHAPE).get_submodule(LAYER)
    assert torch.allclose(layer.weight, torch.cat([w[0] * weighted.fc.weight, w[1] * weighted.head_dist.weight], 1),
                          atol=1e-7)

    class Maxed(DistilledViT):
        def forward(self, x):
            x = self.norm(self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), self.dist.expand(
                x.shape[0], -1, -1), self.patch(x).flatten(2).transpose(1, 2)], 1) + self.pos))
            return torch.maximum(self.fc(x[:, 0]), self.head_dist(x[:, 1]))

    maxed = Maxed(1, 4, 8).eval()
    assert one_head(maxed, SHAPE) is maxed


class WideValues(nn.Module):
    """EfficientFormer's attention: values four times as wide as queries and keys, one ``qkv`` layer for all."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, 4
        self.qkv = nn.Linear(dim, num_heads * self.key_dim * 6)  # q and k: key_dim each; v: 4 key_dim
        self.proj = nn.Linear(num_heads * self.key_dim * 4, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3).split(
            [self.key_dim, self.key_dim, 4 * self.key_dim], dim=3)
        attn = ((q @ k.transpose(-2, -1)) * self.key_dim ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


def test_attention_whose_values_are_wider_than_its_keys_is_kept_whole_not_a_traceback():
    net = vit_with(WideValues)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = net(x)
        same = canonical(net, None, SHAPE)
        assert torch.equal(same(x), expected)
    why = kept_whole(same)
    assert set(why) == {"blocks.0.attn", "blocks.1.attn"} and all("projection reads" in w or "head count" in w
                                                                   for w in why.values())
