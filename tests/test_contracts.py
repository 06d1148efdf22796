"""Every module kind and every composition kind through its contract: a new kind cannot skip a method, and what
the contract promises (shapes, ranges, counts, a save-and-load round trip) holds for each."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import random_data, source

import cnnmod
from cnnmod.composition.base import Composer
from cnnmod.composition.evaluate import evaluate_against_model
from cnnmod.core.cost import cost_report
from cnnmod.io.store import load_composer
from cnnmod.modules.base import BinaryModule, ClassRef
from cnnmod.modules.kinds import MODULE_KINDS
from cnnmod.slim import SlimSettings, merge_slim, slim_module
from cnnmod.slim.artifact import load_merged_slim, save_merged_slim
from cnnmod.slim.merged import FusedSlim

IMAGES = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def made():
    """A source model (rebuildable by name), its node-level modules and slim modules of two of its classes."""
    clf = source("cnn")
    clf.arch = "cnn"
    clf.info["weights_sha256"] = "0" * 64  # as a saved model records it: the modules carry it
    data = random_data(per_class=20)
    node = cnnmod.decompose(clf, data, recipe=cnnmod.DecomposeSettings(ci_samples=10, calibration_samples=5))
    slim = [slim_module(clf, data, c, SlimSettings(size=0.6, samples=20, step=0.3)) for c in (0, 2)]
    return clf, data, node, slim


def module_kinds(made) -> list[BinaryModule]:
    _, _, node, slim = made
    return [node[1], slim[0]]


def test_every_module_kind_is_in_the_store_table_and_implements_the_contract(made):
    abstract = {name for name, v in inspect.getmembers(BinaryModule) if getattr(v, "__isabstractmethod__", False)}
    assert {"class_name", "source_class", "batched_features", "head_weight", "own_params"} <= abstract
    kinds = {type(m).granularity: type(m) for m in module_kinds(made)}
    assert set(kinds) == set(MODULE_KINDS)  # every kind the store reads is one the tests build, and the reverse
    for cls in kinds.values():
        assert not inspect.isabstract(cls), cls


@pytest.mark.parametrize("which", [0, 1], ids=["node", "channel"])
def test_module_contract(made, which, tmp_path):
    clf, _, _, _ = made
    m = module_kinds(made)[which].eval()
    ref = m.ref
    assert isinstance(ref, ClassRef) and ref.dataset == "rand" and ref.name == m.class_name
    assert ref.qualified == f"rand:{m.class_name}" and ref.index == m.concerned
    x = m.prepare(IMAGES)
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == m.input_shape
    with torch.no_grad():
        features, logits, p = m.features(x), m(x), m.score(x)
    assert features.shape[:2] == (1, 6) and features.shape[2] == m.head_weight.shape[1]
    assert logits.shape == (6, 2) and m.head_weight.shape[0] == 2 and m.head_bias.shape == (2,)
    # the head applied to the features is the logits, and p_c is their softmax
    assert torch.allclose(features[0] @ m.head_weight.T + m.head_bias, logits, atol=1e-5)
    assert torch.allclose(p, torch.softmax(logits, 1)[:, 0], atol=1e-6)
    assert 0 < m.kept_fraction() <= 1 and m.params() == m.shared_params() + m.own_params() > 0
    assert m.points and m.source_sha == "0" * 64
    # save and load through the store's table of kinds: the same scores
    cnnmod.save_decomposition([m], tmp_path / "dec", source=clf)
    (loaded,) = cnnmod.load_modules(tmp_path / "dec")
    assert type(loaded) is type(m)
    with torch.no_grad():
        assert torch.allclose(loaded.score(loaded.prepare(IMAGES)), p, atol=1e-6)


def composer_kinds(made) -> dict[str, tuple[Composer, list]]:
    clf, data, node, slim = made
    merged = merge_slim(slim, clf, data, SlimSettings(samples=20))
    other = source("cnn")  # a second model (other weights), for a fused composition across models
    other.arch, other.info = "cnn", {"weights_sha256": "other"}
    other_slim = [slim_module(other, data, 1, SlimSettings(size=0.6, samples=20, step=0.3))]
    fused = FusedSlim([merge_slim(slim, clf, data, SlimSettings(samples=20), foreign=[data.subset([1])]),
                       merge_slim(other_slim, other, data, SlimSettings(samples=20), foreign=[data.subset([0, 2])])])
    return {"vote": (cnnmod.compose(node[:3]), [clf]), "merged-node": (cnnmod.compose(node[:3], mode="merged"), [clf]),
            "vote-slim": (cnnmod.compose(slim), [clf]), "merged-slim": (merged, [clf]), "fused": (fused, [clf, other])}


def expected_vote(row: list[float]) -> int:
    """The voting rule worked out per row (docs/method.md, "Composition"): the one voter (p > 0.5) wins; among
    several voters, or with none, the highest score; ties to the first."""
    voters = [j for j, v in enumerate(row) if v > 0.5] or list(range(len(row)))
    return max(voters, key=lambda j: (row[j], -j))


def expected_params(name: str, c: Composer, made) -> int:
    """What a composer needs to run, counted from its parts: node-level modules share their model once and each
    adds its two-way head; slim networks are all their own parameters."""
    clf, _, node, slim = made
    if name in ("vote", "merged-node"):
        head = node[0].head_weight.numel() + node[0].head_bias.numel()
        return sum(p.numel() for p in clf.net.parameters()) + 3 * head
    if name == "vote-slim":
        return sum(p.numel() for m in slim for p in m.net.parameters())
    return sum(p.numel() for p in c.parameters())


def test_composer_contract(made):
    for name, (c, sources) in composer_kinds(made).items():
        c = c.eval()
        refs = c.refs
        with torch.no_grad():
            scores = c(IMAGES)
        k = len(refs)
        assert scores.shape == (6, k), name
        assert bool(((scores >= 0) & (scores <= 1)).all()), name
        assert c.predict(IMAGES).tolist() == [expected_vote(row) for row in scores.tolist()], name
        assert c.qualified_names == [r.qualified for r in refs] and len(c.kept_fractions()) == k
        assert len(c.source_shas) == k and c.passes >= 1 and c.params() > 0, name
        assert c.mode in ("vote", "merged", "fused") and c.variant, name
        report = cost_report(c, IMAGES, repeats=1, source=sources)
        assert report["params"] == c.params() == expected_params(name, c, made) and report["flops"] > 0, name
        separate = c.separately()
        if separate is not None:  # voting: each column is its part alone
            with torch.no_grad():
                alone = torch.stack([part(IMAGES)[:, 0] for _, part in separate], 1)
            assert torch.allclose(alone, scores, atol=1e-6), name


def test_composers_of_one_model_evaluate_against_it(made):
    clf, data, _, _ = made
    for name, (c, sources) in composer_kinds(made).items():
        if len(sources) > 1:
            continue
        test = data.subset([r.index for r in c.refs])
        r = evaluate_against_model(c, clf, test, torch.device("cpu"), 16)
        assert len(r["per_class"]) == len(c.refs) and r["test_images"] == len(test), name
        # the model's own top-1 among the composition's classes, computed here independently
        with torch.no_grad():
            logits = clf(clf.prepare(test.images))[:, [ref.index for ref in c.refs]]
        expected = 100.0 * float((logits.argmax(1) == test.labels).float().mean())
        assert r["model_top1"] == pytest.approx(expected, abs=1e-3), name


def test_slim_compositions_load_as_composers(made, tmp_path):
    clf, data, _, slim = made
    merged = merge_slim(slim, clf, data, SlimSettings(samples=20))
    save_merged_slim(merged, clf, tmp_path / "merged")
    loaded, sources = load_composer(tmp_path / "merged")
    again, _ = load_merged_slim(tmp_path / "merged")
    assert isinstance(loaded, Composer) and loaded.refs == merged.refs and len(sources) == 1
    with torch.no_grad():
        assert torch.allclose(loaded(IMAGES), merged.eval()(IMAGES), atol=1e-6)
        assert torch.equal(loaded(IMAGES), again(IMAGES))


def test_compiled_latency_times_the_compiled_passes(made, monkeypatch):
    """``cost_report(compile=True)`` times the composition and its model each under ``torch.compile``, warmed up
    first: the compiled composition computes what the eager one does, the counts are the eager report's, and the
    report says it was compiled. Compiled here with dynamo's eager backend (the graphs captured, no kernels
    generated): a cold inductor compile takes tens of seconds, and `benchmarks/slim_and_fast.py --compile` times the
    real one."""
    import cnnmod.core.cost as cost

    clf, data, _, slim = made
    merged = merge_slim(slim, clf, data, SlimSettings(samples=20)).eval()
    made_here, calls = [], {"n": 0}
    assert callable(cost.compiled(merged, "cpu"))

    def spy(fn, device_type):
        inner = torch.compile(fn, backend="eager", dynamic=False)

        def counted(x):
            calls["n"] += 1
            return inner(x)
        made_here.append(inner)
        return counted

    monkeypatch.setattr(cost, "compiled", spy)
    eager = cost_report(merged, IMAGES, repeats=1, source=[clf])
    report = cost_report(merged, IMAGES, repeats=2, source=[clf], compile=True)
    assert len(made_here) == 2  # the composition and its model, each compiled
    # warm-ups (the first compiles), then the timed rounds (each run after torch.utils.benchmark's two warm-ups)
    assert calls["n"] == 2 * (cost.COMPILED_WARMUP + 2 * 3)
    with torch.no_grad():
        assert torch.allclose(made_here[0](IMAGES), merged(IMAGES), atol=1e-5)
        assert torch.allclose(made_here[1](IMAGES), clf(clf.prepare(IMAGES)), atol=1e-5)
    assert report["compiled"] is True and "compiled" not in eager
    counts = ("params", "flops", "params_fraction", "flops_fraction", "model_params", "model_flops")
    assert {k: report[k] for k in counts} == {k: eager[k] for k in counts}
    assert report["latency_ms"] > 0 and report["model_latency_ms"] > 0 and report["latency_fraction"] > 0
