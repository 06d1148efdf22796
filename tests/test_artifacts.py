"""Model artifacts: round trip, verification, atomic writes, safe loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.artifacts import atomic_folder
from cnnmod.data.transforms import InputSpec
from cnnmod.errors import UserError
from cnnmod.models import build
from cnnmod.models.classifier import Classifier
from cnnmod.models.folder import load_model, save_model
from cnnmod.node.artifact import pack_mask, unpack_mask


def _classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = build("resnet20", (1, 8, 8), 3, width=4)
    for m in net.modules():  # non-trivial BatchNorm statistics, so the round trip checks buffers too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return Classifier(net, InputSpec(1, 8, 8, (0.5,), (0.25,)), ["a", "b", "c"], "resnet20", {"width": 4}, "npz:x",
                      info={"metrics": {"test_top1": 12.5}})


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    clf = _classifier().eval()
    save_model(clf, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randint(0, 255, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(clf(clf.prepare(x)), loaded(loaded.prepare(x)))
    assert loaded.class_names == ["a", "b", "c"] and loaded.info["metrics"]["test_top1"] == 12.5
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["kind"] == "model" and config["format_version"] == 1 and len(config["weights_sha256"]) == 64
    assert "resnet20" in (tmp_path / "m" / "README.md").read_text()


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    save_model(_classifier(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the checksum"):
        load_model(tmp_path / "m")


def test_wrong_format_version_kind_and_missing_parts(tmp_path: Path) -> None:
    save_model(_classifier(), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    config = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="format 99"):
        load_model(tmp_path / "m")
    cfg_path.write_text(json.dumps({**config, "kind": "module"}))
    with pytest.raises(UserError, match="is a module folder: expected a model folder"):
        load_model(tmp_path / "m")
    cfg_path.write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_model(tmp_path / "m")
    with pytest.raises(UserError, match="does not exist: expected a model folder"):
        load_model(tmp_path / "absent")


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    save_model(_classifier(), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["arch"] = {"name": "resnet32", "args": {"width": 4}}
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="not a resnet32.*missing layer1.3"):
        load_model(tmp_path / "m")


def test_atomic_folder_leaves_nothing_on_failure_and_guards_existing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    save_model(_classifier(), tmp_path / "out")
    with pytest.raises(UserError, match="exists already.*pass overwrite"):
        save_model(_classifier(1), tmp_path / "out")
    save_model(_classifier(1), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_masks_pack_eight_nodes_a_byte_and_a_short_mask_is_damaged():
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 3, 5), (1,), (8,), (2, 9)):
        mask = torch.rand(shape, generator=g) < 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(UserError, match="holds 8 bits but its point has 105 nodes; the module is damaged"):
        unpack_mask(pack_mask(torch.ones(7, 3, 5, dtype=torch.bool))[:1], (7, 3, 5))


def test_the_device_packing_is_numpys_bit_order():
    """The packing used off the CPU (plain torch) gives numpy's packbits bytes and inverts exactly."""
    from cnnmod.core.bits import pack_bits_torch, unpack_bits_torch

    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 8, 9, 100, 1003):
        b = torch.rand(3, n, generator=g) < 0.3
        packed = pack_bits_torch(b)
        assert torch.equal(packed, torch.from_numpy(np.packbits(b.numpy().astype(np.uint8), axis=-1)))
        assert torch.equal(unpack_bits_torch(packed, n), b)


@pytest.mark.parametrize("commit", ["96f1610", "b99d88f"])
def test_folders_written_by_an_earlier_cnnmod_load_and_score_as_they_did(commit):
    """tests/fixtures/format_COMMIT was written by cnnmod at that commit: at 96f1610 (before the kinds became
    plug-ins) a model, its node-level and slim decompositions, a merged slim composition and a calibrated voting
    composition; at b99d88f (before the kinds registered what they make) also a fused slim composition and
    node-level modules merged into one pass; with the scores each gave then on fixed images. Today's cnnmod
    loads every one and scores alike."""
    import json

    import numpy as np

    from cnnmod.io.store import load_composer

    here = Path(__file__).parent / "fixtures" / f"format_{commit}"
    recorded = json.loads((here / "scores.json").read_text())["scores"]
    images = torch.from_numpy(np.load(here / "bands.npz")["x_train"][::7].copy())
    for name, scores in recorded.items():
        composer, _ = load_composer(here / name)
        with torch.no_grad():
            got = composer.eval()(images)
        assert torch.allclose(got, torch.tensor(scores), atol=1e-5), name
