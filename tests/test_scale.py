"""Scale: streamed image sets (folders, ImageNet's layouts), modules held packed and stored compressed, modules
picked from a decomposition without reading the others, torchrun's ranks checked to see the same data, and the
bad input of large runs (unreadable files, classes that differ, a full disk)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _free_port, assert_user_error, run
from PIL import Image

import cnnmod
from cnnmod.core.graph import ModelGraph
from cnnmod.core.metrics import evaluate_classifier
from cnnmod.core.observe import Sampling, observe
from cnnmod.data import stream
from cnnmod.data.registry import load
from cnnmod.errors import UserError
from cnnmod.models import build
from cnnmod.models.classifier import wrap
from cnnmod.runtime import Passes


def _image(path: Path, rng, size=(12, 12), mode="RGB") -> None:
    """A random image whose classes differ in mean brightness, so that a model can tell them apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _folder(root: Path, classes=("ant", "bee", "cat"), train=8, test=3, size=(12, 12), suffix=".png") -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            for i in range(n):
                _image(root / split / c / f"{c}{i}{suffix}", rng, size)
    return root


def test_a_streamed_folder_is_the_in_memory_one_read_batch_by_batch(tmp_path):
    root = _folder(tmp_path / "f")
    for split in ("train", "test"):
        mem, streamed = load(f"folder:{root}", split, stream=False), load(f"folder:{root}", split, stream=True)
        assert streamed.streamed and not mem.streamed
        assert isinstance(streamed.images, stream.FileImages) and streamed.images.shape == mem.images.shape
        assert torch.equal(streamed.images[:], mem.images) and torch.equal(streamed.labels, mem.labels)
        assert streamed.class_names == mem.class_names == ["ant", "bee", "cat"]
        assert streamed.mean == pytest.approx(mem.mean, abs=1e-9) and streamed.std == pytest.approx(mem.std, abs=1e-9)
        picked = streamed.subset([2, 0])  # narrowing a listing decodes nothing, and picks the same images
        assert isinstance(picked.images, stream.FileImages)
        assert torch.equal(picked.images[:], mem.subset([2, 0]).images)
        assert torch.equal(torch.cat(list(streamed.batches(5))), mem.images)  # several batches, in order
    torch.manual_seed(0)
    train_mem, train_streamed = load(f"folder:{root}", "train", stream=False), load(f"folder:{root}", "train",
                                                                                    stream=True)
    clf = wrap(build("cnn", (3, 12, 12), 3).eval(), data=train_mem, mean=train_mem.mean, std=train_mem.std)
    graph = ModelGraph(clf.net, clf.spec.shape)
    a = observe(clf.net, graph, clf.prepare, train_mem, Sampling(5), Passes())
    b = observe(clf.net, graph, clf.prepare, train_streamed, Sampling(5), Passes())
    for p in graph.points:
        assert torch.equal(a.active[p.name], b.active[p.name])
        assert all(torch.equal(a.early[k][p.name], b.early[k][p.name]) for k in a.early)
    test_mem, test_streamed = load(f"folder:{root}", "test", stream=False), load(f"folder:{root}", "test", stream=True)
    assert evaluate_classifier(clf, test_mem, torch.device("cpu"), 4) == evaluate_classifier(
        clf, test_streamed, torch.device("cpu"), 4)


def test_streamed_files_of_other_sizes_are_brought_to_the_first_ones(tmp_path):
    """Shorter side resized to cover the stored size, then the centre cut out; the stored size is the first
    training image's."""
    root = tmp_path / "f"
    rng = np.random.default_rng(1)
    _image(root / "train" / "a" / "0.png", rng, (8, 8))
    wide = rng.integers(0, 256, (8, 24, 3), dtype=np.uint8)  # 24 wide, 8 high: its middle third is kept
    (root / "train" / "b").mkdir(parents=True)
    Image.fromarray(wide).save(root / "train" / "b" / "0.png")
    Image.fromarray(wide[:, 8:16]).save(root / "train" / "b" / "1.png")
    _image(root / "test" / "a" / "0.png", rng, (8, 8))
    data = load(f"folder:{root}", "train", stream=True)
    assert data.input_shape == (3, 8, 8)
    x = data.images[:]
    assert torch.equal(x[1], x[2]) and torch.equal(x[1], torch.from_numpy(wide[:, 8:16]).permute(2, 0, 1))


def test_large_folders_stream_by_themselves(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", train=4, test=1)
    assert not load(f"folder:{root}").streamed
    monkeypatch.setattr(stream, "STREAM_ABOVE", 10)  # 12 training images
    assert load(f"folder:{root}").streamed


def _imagenet(root: Path, wnids=("n01440764", "n01443537", "n01484850"), per_class=3, val_per_class=2,
              val="folders") -> dict:
    """An ImageNet folder as it ships: train/<wnid>/<wnid>_<n>.JPEG, and the validation split in class folders,
    or flat with Kaggle's LOC_val_solution.csv, or flat with the devkit's ground truth and meta.mat."""
    rng = np.random.default_rng(0)
    for w in wnids:
        for i in range(per_class):
            _image(root / "train" / w / f"{w}_{i}.JPEG", rng, (40, 30))
    labels = [i % len(wnids) for i in range(val_per_class * len(wnids))][::-1]
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(len(labels))]
    for name, c in zip(names, labels, strict=True):
        _image(root / "val" / (wnids[c] if val == "folders" else "") / f"{name}.JPEG", rng, (30, 50))
    if val == "kaggle":
        rows = ["ImageId,PredictionString"] + [f"{n},{wnids[c]} 1 2 3 4 {wnids[c]} 5 6 7 8"
                                               for n, c in zip(names, labels, strict=True)]
        (root / "LOC_val_solution.csv").write_text("\n".join(rows[:1] + rows[1:][::-1]) + "\n")
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name{i}, other\n" for i, w in enumerate(wnids)))
    if val == "devkit":
        from scipy.io import savemat

        fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                  "num_train_images"]
        synsets = np.zeros((len(wnids) + 1,), dtype=[(f, "O") for f in fields])
        ids = [3, 1, 2]  # the devkit's IDs are not the sorted order
        for w, i in zip(wnids, ids, strict=True):
            synsets[i - 1] = (i, w, f"kit{w[-2:]}, x", "g", 0, np.zeros(0), 0, per_class)
        synsets[len(wnids)] = (len(wnids) + 1, "n00000001", "fish", "g", 2, np.zeros(0), 1, 0)  # not a leaf
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        savemat(str(devkit / "meta.mat"), {"synsets": synsets})
        by_wnid = dict(zip(wnids, ids, strict=True))
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{by_wnid[wnids[c]]}\n" for c in labels))
    return {"labels": labels, "wnids": list(wnids)}


@pytest.mark.parametrize("val", ["folders", "kaggle", "devkit"])
def test_imagenet_in_each_layout_it_ships_in(tmp_path, val):
    made = _imagenet(tmp_path / "imagenet", val=val)
    train, test = load("imagenet", "train", tmp_path), load(f"imagenet:{tmp_path / 'imagenet'}", "test")
    assert train.streamed and test.streamed and train.input_shape == (3, 256, 256)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = sorted(made["labels"]) if val == "folders" else made["labels"]  # class folders list by class
    assert test.labels.tolist() == expected
    names = {"folders": made["wnids"], "kaggle": ["name0", "name1", "name2"],
             "devkit": ["kit64", "kit37", "kit50"]}[val]
    assert train.class_names == names
    x = test.images[:2]
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.uint8
    assert load("imagenet:0,2", "train", tmp_path).class_names == [names[0], names[2]]


def test_imagenet_splits_whose_classes_differ_are_refused(tmp_path):
    _imagenet(tmp_path / "imagenet", val="kaggle")
    csv = tmp_path / "imagenet" / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace("n01484850 1", "n09999999 1", 1))
    with pytest.raises(UserError, match="classes \\['n09999999'\\] that .* lacks: the splits' classes differ"):
        load("imagenet", "test", tmp_path)
    (tmp_path / "imagenet" / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError, match="is flat but neither LOC_val_solution.csv nor .* labels it"):
        load("imagenet", "test", tmp_path)


def _model_on(folder: str, tmp_path: Path, capsys) -> Path:
    out = tmp_path / "model"
    rc, _, err = run(["train", "--arch", "cnn", "--data", folder, "--epochs", "1", "--batch-size", "8", "--out",
                      str(out), "--json"], capsys)
    assert rc == 0, err
    return out


def test_an_unreadable_streamed_image_is_named_or_skipped_when_asked(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "f", suffix=".jpg")
    model = _model_on(f"folder:{root}", tmp_path, capsys)
    bad = root / "test" / "bee" / "bee1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    monkeypatch.setattr(stream, "STREAM_ABOVE", 5)
    rc, out, err = run(["evaluate-model", str(model), "--json"], capsys)
    assert_user_error(rc, out, err, f"cannot read image {bad}", "--skip-bad-images")
    rc, out, err = run(["evaluate-model", str(model), "--json", "--skip-bad-images"], capsys)
    assert rc == 0, err
    assert "skipped 1 unreadable image of" in err and f"the first: {bad}" in err
    assert json.loads(out)["count"] == 8  # 9 test images, one left out


def test_a_folder_whose_classes_are_not_the_models_is_refused(tmp_path, capsys):
    model = _model_on(f"folder:{_folder(tmp_path / 'f')}", tmp_path, capsys)
    other = _folder(tmp_path / "g", classes=("ant", "bee", "dog"))
    rc, out, err = run(["evaluate-model", str(model), "--data", f"folder:{other}", "--json"], capsys)
    assert_user_error(rc, out, err, "differ from the model's", "'cat' is 'dog' there")
    rc, out, err = run(["decompose", str(model), "--data", f"folder:{other}", "--out", str(tmp_path / "d")], capsys)
    assert_user_error(rc, out, err, "differ from the model's")
    assert not (tmp_path / "d").exists()


def test_training_on_a_streamed_set_is_refused(tmp_path, capsys):
    _imagenet(tmp_path / "imagenet")
    rc, out, err = run(["train", "--arch", "cnn", "--data", f"imagenet:{tmp_path / 'imagenet'}", "--epochs", "1",
                        "--out", str(tmp_path / "m")], capsys)
    assert_user_error(rc, out, err, "is streamed from disk", "cnnmod import")


def test_a_full_disk_leaves_nothing_half_written(decomposed, tmp_path, capsys, monkeypatch):
    model, _ = decomposed
    import cnnmod.artifacts as artifacts

    real, calls = artifacts.save_file, []

    def filling(tensors, path, *a, **k):  # the disk fills up as the decomposition folder's third file is written
        if Path(path).is_relative_to(tmp_path) and Path(path).relative_to(tmp_path).parts[0].startswith(".full."):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(artifacts, "save_file", filling)
    rc, out, err = run(["decompose", str(model), "--out", str(tmp_path / "full")], capsys)
    last = err.strip().splitlines()[-1]  # after the progress line
    assert rc == 2 and out == "" and last.startswith("cnnmod: error: the disk is full (No space left on device, "
                                                     f"writing under {tmp_path})") and "nothing half-written" in last
    # no folder half-written: the finished parts kept for --resume stay, each whole
    assert len(calls) == 3 and [p.name for p in tmp_path.iterdir() if p.name.startswith((".full", "full"))] == [
        "full.resume"]
    monkeypatch.undo()  # space freed
    rc, out, err = run(["decompose", str(model), "--out", str(tmp_path / "full"), "--resume"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".full", "full"))) == ["full"]


@pytest.fixture
def decomposed(tmp_path, npz_data, capsys) -> tuple[Path, Path]:
    from conftest import train_small_cnn

    model = tmp_path / "model"
    train_small_cnn(model, npz_data, capsys, epochs=3)
    out = tmp_path / "dec"
    rc, _, err = run(["decompose", str(model), "--out", str(out), "--set", "calibration_samples=0"], capsys)
    assert rc == 0, err
    return model, out


def test_masks_are_held_packed_and_stored_compressed_where_that_pays(decomposed):
    from safetensors.torch import load_file

    _, out = decomposed
    modules = cnnmod.load_modules(out)
    for m in modules:
        packed = m.packed_masks
        assert {n: t.numel() for n, t in packed.items()} == {p.name: -(-p.size // 8) for p in m.points}
        assert all(t.dtype == torch.uint8 for t in packed.values())
        assert not [b for b in m.buffers() if b.dtype == torch.bool]  # nothing unpacked is kept
        stored = load_file(str(out / "modules" / f"c{m.concerned:02d}-band{m.concerned}" / "model.safetensors"))
        for p in m.points:
            mask = m.masks[p.name]
            if f"maskz.{p.name}" in stored:  # compressed: mostly ones, and at least a tenth smaller
                assert stored[f"maskz.{p.name}"].numel() <= 0.9 * packed[p.name].numel()
            else:
                assert torch.equal(stored[f"mask.{p.name}"], packed[p.name])
            assert mask.shape == p.shape and mask.dtype == torch.bool
    assert any(k.startswith("maskz.") for k in stored)  # a trained model's modules keep most nodes


def test_modules_picked_from_a_decomposition_read_only_theirs(decomposed, capsys, tmp_path):
    _, out = decomposed
    everything = cnnmod.load_modules(out)
    other = out / "modules" / "c00-band0" / "model.safetensors"
    other.write_bytes(b"damaged")  # never read when only class 2 is asked for
    picked = cnnmod.load_modules(f"{out}:2")
    assert [m.concerned for m in picked] == [2]
    assert all(torch.equal(picked[0].masks[k], everything[2].masks[k]) for k in everything[2].masks)
    with pytest.raises(UserError, match="does not match the checksum"):
        cnnmod.load_modules(f"{out}:0,2")
    with pytest.raises(UserError, match="has no module for class 7"):
        cnnmod.load_modules(f"{out}:7")
    rc, stdout, err = run(["compose", f"{out}:1,2", "--out", str(tmp_path / "c"), "--json"], capsys)
    assert rc == 0, err
    # a composition names its classes qualified by their data set, as its folder records them
    assert json.loads(stdout)["classes"] == [m.ref.qualified for m in everything[1:3]]
    assert [c.rpartition(":")[2] for c in json.loads(stdout)["classes"]] == ["band1", "band2"]


RANKS_SEE = """
import sys, torch
from cnnmod.runtime import init_distributed, shutdown_distributed
from cnnmod.errors import UserError
from cnnmod.data.dataset import ImageSet
from cnnmod.core.graph import ModelGraph
from cnnmod.core.observe import Sampling, observe
from cnnmod.models import build
from cnnmod.models.classifier import wrap
from cnnmod.runtime import Passes
dd, dev = init_distributed(torch.device("cpu"))
for case in ("same", "differ"):  # one launch: the same data on both ranks, then one image changed on rank 1
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    if dd.rank == 1 and case == "differ":
        images[3] = 0
    data = ImageSet("d", "train", images, torch.arange(12) % 3, ["a", "b", "c"], (0.5,), (0.25,))
    clf = wrap(build("cnn", (1, 8, 8), 3).eval(), data=data, mean=data.mean, std=data.std)
    try:
        observe(clf.net, ModelGraph(clf.net, (1, 8, 8)), clf.prepare, data, Sampling(2), Passes(dd=dd))
        said = "observed"
    except UserError as e:
        said = f"refused: {e}"
    open(f"{sys.argv[1]}/rank{dd.rank}-{case}.txt", "w").write(said)
shutdown_distributed()
"""


def test_torchrun_ranks_that_see_different_data_are_refused(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SEE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"rank{r}-same.txt").read_text() for r in range(2)] == ["observed", "observed"]
    refused = [(tmp_path / f"rank{r}-differ.txt").read_text() for r in range(2)]
    assert all(ln.startswith("refused: the torchrun ranks see different training data (d)") for ln in refused)


def test_torchrun_slim_modules_equal_one_process(decomposed, tmp_path, capsys):
    model, _ = decomposed
    # each module its own budget (one budget for all is one process's: torchrun prunes them apart); without the
    # least-squares refit, whose solver rounds differently with the number of threads, so that the modules can be
    # compared bit for bit
    args = ["decompose", str(model), "--granularity", "channel", "--size", "0.5", "--set", "samples=16",
            "--set", "budget=module", "--set", "reconstruct=false", "--device", "cpu", "--json"]
    rc, _, err = run([*args, "--out", str(tmp_path / "one")], capsys)
    assert rc == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "cnnmod", *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if ".rank" in p.name]  # the staging folders are gone
    one, two = cnnmod.load_modules(tmp_path / "one"), cnnmod.load_modules(tmp_path / "two")
    assert [m.concerned for m in two] == [0, 1, 2]
    for a, b in zip(one, two, strict=True):
        sa, sb = a.net.state_dict(), b.net.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.metrics["binary_accuracy"] == b.metrics["binary_accuracy"]


def test_a_disk_that_fills_while_spilling_is_one_line_and_leaves_no_spill(decomposed, tmp_path, capsys,
                                                                          monkeypatch):
    import cnnmod.core.observe as observe_module

    model, _ = decomposed
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("CNNMOD_SPILL_DIR", str(spill))
    monkeypatch.setattr(observe_module, "SPILL_ABOVE", 0)  # every pass spills
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    rc, out, err = run(["decompose", str(model), "--out", str(tmp_path / "d"), "--set", "calibration_samples=0"],
                       capsys)
    assert rc == 2 and out == "" and "cnnmod: error: the disk is full (No space left on device" in err
    assert len(calls) == 4 and list(spill.iterdir()) == [] and not (tmp_path / "d").exists()


def test_quadratic_steps_are_announced_with_their_cost(decomposed, tmp_path, capsys, monkeypatch):
    import cnnmod.jobs.decompose as job

    model, _ = decomposed
    monkeypatch.setattr(job, "HEADS_UP", 10)
    rc, _, err = run(["decompose", str(model), "--out", str(tmp_path / "d"), "--set", "calibration_samples=2"], capsys)
    assert rc == 0, err
    said = " ".join(err.split())
    assert "calibration: each of the 3 modules scores 12 held-out training images (36 module passes" in said
    assert "--set calibration_samples=1 (or 0)" in said
    assert "measuring: each of the 3 modules scores" in said and "--set measure=false" in said


def test_torchrun_evaluation_equals_one_process(decomposed, tmp_path, capsys):
    model, dec = decomposed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    compared = {"evaluate-model": ("top1", "top5", "per_class", "count"),
                "evaluate": ("model_top1", "composed_top1", "per_class", "test_images")}
    for args in (["evaluate-model", str(model)], ["evaluate", str(dec), "--no-cost"]):
        rc, one, err = run([*args, "--device", "cpu", "--batch-size", "4", "--json"], capsys)
        assert rc == 0, err
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "cnnmod", *args,
                               "--device", "cpu", "--batch-size", "4", "--json"], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert len(lines) == 1  # rank 0 alone reports
        a, b = json.loads(one), json.loads(lines[0])
        for key in compared[args[0]]:  # each command's own figures, present on both sides
            assert key in a and a[key] == b[key], key
