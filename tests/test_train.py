"""The training loop: learns, keeps the best-validation checkpoint, is deterministic, runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _free_port, assert_user_error, run, stopped_training

from cnnmod.core.metrics import evaluate_classifier
from cnnmod.data import load
from cnnmod.data.dataset import ImageSet
from cnnmod.data.transforms import Augment, InputSpec
from cnnmod.energy import EnergyRecord, training_energy
from cnnmod.errors import UserError
from cnnmod.jobs import train as train_job
from cnnmod.jobs.train import train
from cnnmod.models import train as loop
from cnnmod.models.folder import load_model
from cnnmod.models.resume import read_state, write_state
from cnnmod.models.train import TrainSettings, _val_accuracy, class_weights, epoch_batches
from cnnmod.runtime import Distributed


def _settings(data: str, **kw) -> TrainSettings:
    base = dict(arch="cnn", data=data, epochs=6, batch_size=16, lr=0.01, optimizer="adam", seed=3, device="cpu")
    return TrainSettings(**{**base, **kw})


def test_training_learns_and_keeps_the_best_checkpoint(tmp_path: Path, npz_data: str) -> None:
    r = train(_settings(npz_data), tmp_path / "m", show_progress=False)
    assert r["test_top1"] >= 90.0  # the bands are easy: a working loop must learn them
    vals = [h["val_top1"] for h in r["history"]]
    assert r["best_epoch"] == vals.index(max(vals)) + 1
    best, last = load_model(tmp_path / "m"), load_model(tmp_path / "m" / "last")
    test = load(npz_data, "test")
    assert evaluate_classifier(best, test, torch.device("cpu"))["top1"] == r["test_top1"]
    assert evaluate_classifier(last, test, torch.device("cpu"))["top1"] == r["last_test_top1"]
    assert best.info["training"]["best_epoch"] == r["best_epoch"]


def test_same_seed_same_weights(tmp_path: Path, npz_data: str) -> None:
    a = train(_settings(npz_data, epochs=2), None, show_progress=False)["model"]
    b = train(_settings(npz_data, epochs=2), None, show_progress=False)["model"]
    c = train(_settings(npz_data, epochs=2, seed=4), None, show_progress=False)["model"]
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("arch,optimizer", [("cnn", "sgd"), ("cnn", "adam"), ("mobilenet_v2", "sgd")])
def test_a_stopped_run_resumed_gives_the_weights_of_one_that_never_stopped(tmp_path: Path, npz_data: str, monkeypatch,
                                                                           arch: str, optimizer: str) -> None:
    # crops and flips, so that the augmentation's generator must be restored too; momentum or moments, the
    # optimizer's state; MobileNetV2's dropout (and BatchNorm), the global generator
    monkeypatch.setattr(train_job, "default_augment", lambda *a: Augment(crop_padding=1, hflip=True))
    s = _settings(npz_data, arch=arch, epochs=4, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01,
                  arch_args={"width_mult": 0.25} if arch == "mobilenet_v2" else {})
    whole = train(s, tmp_path / "whole", show_progress=False)
    stopped_training(s, tmp_path / "m", 2, monkeypatch)
    r = train(s, tmp_path / "m", show_progress=False, resume=True)
    assert r["resumed_after_epoch"] == 2 and len(r["history"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands.npz", "m", "whole"]  # the kept state is gone
    for sub in ("", "last"):
        a, b = load_model(tmp_path / "whole" / sub).net.state_dict(), load_model(tmp_path / "m" / sub).net.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    assert [h["val_top1"] for h in r["history"]] == [h["val_top1"] for h in whole["history"]]
    assert r["best_epoch"] == whole["best_epoch"] and r["test_top1"] == whole["test_top1"]
    assert load_model(tmp_path / "m").info["training"]["resumed_after_epoch"] == 2
    # the same, with the augmentation's generator left as a fresh run seeds it: other weights, so the check can tell
    stopped_training(s, tmp_path / "n", 2, monkeypatch)
    monkeypatch.setattr(loop, "_set_generators", lambda start, gen, device, dd: torch.set_rng_state(start["rng"]))
    forgot = train(s, tmp_path / "n", show_progress=False, resume=True)["model"].net.state_dict()
    assert not all(torch.equal(forgot[k], a[k]) for k in a)


def test_a_training_state_reads_back_as_written_through_json_and_safetensors(tmp_path: Path) -> None:
    # integer keys (an optimizer's state), tuples (Adam's betas), None, and a key with dots that meets a path
    state = {"epoch": 2, 0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}, "betas": (0.9, 0.999),
             "best_state": None, "a.b": torch.ones(2), "a": {"b": torch.zeros(3, dtype=torch.int64)}}
    write_state(tmp_path / "s", state, {"arch": "cnn", "data": "npz:x", "epochs": 3})
    back = read_state(tmp_path / "s", {"arch": "cnn", "data": "npz:x", "epochs": 3})
    assert set(back) == set(state) and back["betas"] == (0.9, 0.999) and back["best_state"] is None
    for got, want in ((back[0]["step"], state[0]["step"]), (back[0]["exp_avg"], state[0]["exp_avg"]),
                      (back["a.b"], state["a.b"]), (back["a"]["b"], state["a"]["b"])):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_run_of_two_processes_goes_on_only_with_two() -> None:
    gen = torch.Generator().manual_seed(0)
    kept = loop._generators(gen, torch.device("cpu"), Distributed())  # one process: one augmentation generator
    assert kept["augment"].shape[0] == 1 and torch.equal(kept["augment"][0], gen.get_state())
    two = {**kept, "augment": kept["augment"].repeat(2, 1)}
    with pytest.raises(UserError, match=r"trained on 2 process\(es\), not 1: go on with as many"):
        loop._set_generators(two, gen, torch.device("cpu"), Distributed())


def test_a_resumed_run_counts_its_earlier_epochs_energy_at_the_power_measured_for_its_own() -> None:
    # measured: epochs 3 and 4 (4 + 6 = 10 s) took 10 s and 0.002 kWh; epochs 1 and 2 took 30 s more
    record = EnergyRecord("training", 10.0, 0.002, 0.001, "FRA", 500.0, "estimator", "estimated", False, 0.0015)
    history = [{"epoch": e, "seconds": s} for e, s in ((1, 10.0), (2, 20.0), (3, 4.0), (4, 6.0))]
    e = training_energy(record, history, best_epoch=2, resumed_after=2)
    assert e["training"]["kwh"] == pytest.approx(0.008) and e["training"]["seconds"] == pytest.approx(40.0)
    assert e["training_to_best_epoch"]["kwh"] == pytest.approx(0.006)  # epochs 1-2: 30 of the 40 s
    assert training_energy(record, history, best_epoch=4)["training"]["kwh"] == pytest.approx(0.002)  # not resumed


def test_a_stopped_run_is_neither_restarted_nor_resumed_by_mistake(tmp_path: Path, npz_data: str, monkeypatch,
                                                                   capsys) -> None:
    s = _settings(npz_data, epochs=3)
    stopped_training(s, tmp_path / "m", 1, monkeypatch)
    capsys.readouterr()
    args = ["train", "--arch", "cnn", "--data", npz_data, "--batch-size", "16", "--lr", "0.01", "--optimizer", "adam",
            "--seed", "3", "--device", "cpu", "--out", str(tmp_path / "m")]
    assert_user_error(*run(args + ["--epochs", "3"], capsys), "m.resume holds epoch 1 of 3 of a training run that "
                      "stopped", "--resume", "--overwrite")
    assert_user_error(*run(args + ["--epochs", "5", "--resume"], capsys), "holds a run with other settings: epochs 3 "
                      "(now 5)")
    weights = tmp_path / "m.resume" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert_user_error(*run(args + ["--epochs", "3", "--resume"], capsys), "does not match the checksum")
    weights.write_bytes(good)
    rc, out, err = run(args + ["--epochs", "3", "--resume", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["resumed_after_epoch"] == 1 and "going on after epoch 1" in err
    assert not (tmp_path / "m.resume").exists()
    # --overwrite starts again: the kept state is dropped, not gone on from
    stopped_training(s, tmp_path / "o", 2, monkeypatch)
    capsys.readouterr()
    rc, out, err = run(args[:-1] + [str(tmp_path / "o"), "--epochs", "3", "--overwrite", "--json"], capsys)
    assert rc == 0, err
    assert "resumed_after_epoch" not in json.loads(out) and not (tmp_path / "o.resume").exists()


def test_class_subset_and_subset_size(tmp_path: Path, npz_data: str, capsys) -> None:
    r = train(_settings(npz_data, classes=[2, 0], subset=40, epochs=1), tmp_path / "m", show_progress=False)
    # 40 of the two classes' images, a tenth of them held out for validation
    assert "36 images, 4 for validation, 2 classes" in capsys.readouterr().err
    m = load_model(tmp_path / "m")
    assert m.class_names == ["band2", "band0"] and m.source_classes == [2, 0]
    h = r["history"][0]
    assert h["epoch"] == 1 and r["model"].info["training"]["subset"] == 40


def test_distributed_batches_partition_the_epoch() -> None:
    ranks = [epoch_batches(10, 2, 1, 0, Distributed(rank=r, world=3)) for r in range(3)]
    seen = torch.cat([torch.cat(b) for b in ranks])
    assert len(seen) == 12 and set(seen.tolist()) == set(range(10))  # padded by two repeats
    assert len({sum(len(b) for b in r) for r in ranks}) == 1  # same number of steps on every rank


def test_balanced_draws_give_every_class_an_equal_share() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    drawn = torch.cat([torch.cat(epoch_batches(len(labels), 50, e, 0, Distributed(), class_weights(labels)))
                       for e in range(1, 21)])
    assert len(drawn) == 20 * len(labels)  # an epoch keeps its length
    share = torch.bincount(labels[drawn], minlength=3).float() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02), share  # plain draws: 0.90 / 0.09 / 0.01
    rare = drawn[labels[drawn] == 2]
    assert set(rare.tolist()) == set(range(990, 1000))  # every rare image is drawn, none invented


class _AlwaysFirst(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0]).expand(x.shape[0], 2)


def test_balanced_validation_is_the_mean_of_per_class_accuracy() -> None:
    labels = torch.tensor([0] * 9 + [1] * 1)
    val = ImageSet("v", "val", torch.zeros(10, 1, 4, 4, dtype=torch.uint8), labels, ["a", "b"], (0.5,), (0.5,))
    spec = InputSpec(1, 4, 4, (0.5,), (0.5,))
    cpu, one = torch.device("cpu"), Distributed()
    assert _val_accuracy(_AlwaysFirst(), val, spec, cpu, one) == pytest.approx(90.0)
    assert _val_accuracy(_AlwaysFirst(), val, spec, cpu, one, balanced=True) == pytest.approx(50.0)


def test_balanced_training_runs_and_is_recorded(tmp_path: Path, npz_data: str) -> None:
    plain = train(_settings(npz_data, epochs=1), None, show_progress=False)["model"]
    r = train(_settings(npz_data, epochs=1, balanced=True), None, show_progress=False)
    assert r["model"].info["training"]["balanced"] is True
    a, b = plain.net.state_dict(), r["model"].net.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # other draws, other weights


def test_torchrun_two_processes_on_cpu(tmp_path: Path, npz_data: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "cnnmod", "train", "--arch", "cnn", "--data", npz_data,
           "--epochs", "3", "--batch-size", "8", "--optimizer", "adam", "--lr", "0.01", "--device", "cpu",
           "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["test_top1"] >= 80.0
    model = load_model(tmp_path / "ddp")
    assert model.info["training"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands.npz", "ddp"]  # one artifact, no temporaries
