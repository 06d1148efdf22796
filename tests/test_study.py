"""The study (``cnnmod reproduce``) on a tiny preset: every part, resuming, the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run, stop_after_epoch, write_npz

from cnnmod.artifacts import read_config
from cnnmod.data import load
from cnnmod.errors import UserError
from cnnmod.experiments.presets import Preset
from cnnmod.experiments.report import charted, figures, write_report
from cnnmod.experiments.study import PARTS, Study
from cnnmod.io.store import load_composer
from cnnmod.models.folder import load_model

TINY = Preset(name="tiny", arch="cnn", epochs=2, weak_epochs=1, weak_subset=30, second_epochs=2, tma_epochs=1,
              optimizer="adam", ci_samples=20, reuse_classes=2, dense_epochs=1)


@pytest.fixture
def datasets(tmp_path: Path) -> tuple[str, str]:
    return (f"npz:{write_npz(tmp_path / 'a.npz', classes=3, seed=0)}",
            f"npz:{write_npz(tmp_path / 'b.npz', n_per_class=30, classes=2, seed=7)}")


def test_every_part_then_resume_and_report(tmp_path, datasets):
    a, b = datasets
    out = tmp_path / "study"
    study = Study(out, TINY, (a, b), "FRA", seed=1, device="cpu")
    snapshots: list[dict] = []
    results = study.run(on_part=lambda r: snapshots.append(dict(r)))
    assert len(study.meter.records) > 0
    # the results so far before every part after the first, then the whole: each lists what is still to come
    assert [s["unfinished"] for s in snapshots] == [list(PARTS[i:]) for i in range(1, len(PARTS) + 1)]
    assert "intra_reuse" not in snapshots[0] and snapshots[-1] == results
    (tmp_path / "partial").mkdir()
    partial, _ = write_report(snapshots[1], tmp_path / "partial")
    assert "**Unfinished:** inter_reuse, intra_replace" in partial.read_text()
    # the accuracy chart holds the scenarios measured so far (and only those): no bars of 0 for the rest
    assert [key for _, key in charted(snapshots[1]["summary"])] == [
        "top1_change_pp", "top5_change_pp", "intra_reuse_pp", "intra_reuse_refit_pp"]
    assert "accuracy" in figures(snapshots[1]) and "accuracy" not in figures(
        {**snapshots[1], "summary": {k: None for k in snapshots[1]["summary"]}})
    assert len(results["decomposition"]) == 3 and {r["variant"] for r in results["decomposition"]} == {
        "mc", "mc-bln", "mc-bi"}
    assert len(results["intra_reuse"]) == 1            # C(2, 2) pairs of the 2 drawn classes
    assert len(results["inter_reuse"]) == 4            # 2 x 2
    assert len(results["intra_replace"]) == 3          # every class of the weak model, in turn
    assert len(results["inter_replace"]) == 4
    assert len(results["dense"]) == 8                  # 1-4 hidden layers x 2 variants
    assert [e["scenario"] for e in results["energy"]][0] == "intra_reuse"
    # the scenario as a whole: every TMA trained against every composition plus the one decomposition they share
    inter = next(e for e in results["energy"] if e["scenario"] == "inter_reuse")
    trained = sum(r["training_energy"]["training"]["kg_co2e"] for r in results["inter_reuse"])
    reused = sum(r["reuse_energy"]["kg_co2e"] for r in results["inter_reuse"])
    assert (inter["models_trained"], inter["compositions"]) == (4, 4)
    assert inter["ratio_all_training_to_all_reuse_with_decomposition"] == pytest.approx(
        trained / (reused + inter["decomposition_kg_co2e_once"]))
    replace_row = next(e for e in results["energy"] if e["scenario"] == "intra_replace")
    assert (replace_row["models_trained"], replace_row["compositions"]) == (1, 3)  # one better model, trained once
    for row in results["intra_reuse"]:
        assert row["delta_pp"] == pytest.approx(row["ma"] - row["tma"], abs=1e-3)
        # MA and TMA counted here from what the study saved: the composition's votes and the model trained from
        # scratch on the two classes, on those classes' test images
        c0, c1 = row["classes"]
        test = load(a, "test", classes=[c0, c1])
        composition, _ = load_composer(out / "compositions" / f"intra-{c0}-{c1}")
        (tma_dir,) = (out / "models").glob(f"tma-{c0}-{c1}-*")
        tma = load_model(tma_dir).eval()
        with torch.no_grad():
            ma_right = composition.eval().predict(test.images) == test.labels
            tma_right = tma(tma.prepare(test.images)).argmax(1) == test.labels
        assert row["ma"] == pytest.approx(100.0 * float(ma_right.float().mean()), abs=0.01)
        assert row["tma"] == pytest.approx(100.0 * float(tma_right.float().mean()), abs=0.01)
        assert row["training_energy"]["training"]["kg_co2e"] > 0 and row["reuse_energy"]["kwh"] > 0
    for row in results["inter_reuse"]:  # the refitted composition is measured, and differs from MMA's only by it
        assert row["delta_refit_pp"] == pytest.approx(row["mma_refit"] - row["tma"], abs=1e-3)
        assert row["reuse_refit_energy"]["kwh"] > 0
        assert row["delta_ood_pp"] == pytest.approx(row["ma_ood"] - row["tma"], abs=1e-3)
    assert results["summary"]["inter_reuse_refit_pp"] == pytest.approx(
        sum(r["delta_refit_pp"] for r in results["inter_reuse"]) / 4, abs=1e-6)
    for row in results["intra_replace"]:
        assert row["prior_top1"] == results["intra_replace"][0]["prior_top1"]  # the same weak composition
    s = results["summary"]
    assert s["intra_reuse_pp"] == pytest.approx(sum(r["delta_pp"] for r in results["intra_reuse"]), abs=1e-6)
    # a second run resumes: nothing is trained or measured again, and the figures are the same
    again = Study(out, TINY, (a, b), "FRA", seed=1, device="cpu")
    second = again.run()
    assert again.meter.records == [] and second["summary"] == s
    # the time each part took is kept from the run that did it
    assert set(second["part_seconds"]) == set(results["part_seconds"]) == {
        "decomposition", "intra_reuse", "inter_reuse", "intra_replace", "inter_replace", "energy", "dense"}
    assert second["part_seconds"] == results["part_seconds"] and second["seconds_all_runs"] > 0
    md, page = write_report(second, out)
    text = md.read_text()
    assert "## 1. Decomposition cost" in text and "| intra-data-set reuse, MA - TMA (pp) |" in text
    assert "| inter-data-set reuse, CL + heads refitted (pp; ours) |" in text
    assert page.read_text().count("data:image/png;base64,") == 4
    # a run interrupted inside a part keeps the rows it finished: a resumed run builds and measures none again
    for part in ("inter_reuse", "inter_replace"):
        (out / "parts" / f"{part}.json").unlink()
    assert len(list((out / "parts" / "inter_replace").glob("*.json"))) == 4
    third = Study(out, TINY, (a, b), "FRA", seed=1, device="cpu")
    resumed = third.run()
    assert third.meter.records == [] and resumed["summary"] == s
    assert resumed["inter_replace"] == results["inter_replace"]
    # another preset's folder is refused, naming what differs
    with pytest.raises(UserError, match="other settings"):
        Study(out, Preset(name="other", arch="cnn"), (a, b), "FRA", seed=1, device="cpu")


def test_reproduce_command_bad_input(tmp_path, capsys):
    assert_user_error(*run(["reproduce", "--preset", "huge", "--out", str(tmp_path / "s")], capsys),
                      "unknown preset 'huge'")
    assert_user_error(*run(["reproduce", "--out", str(tmp_path / "s"), "--country", "QQQ"], capsys),
                      "unknown country code")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert_user_error(*run(["reproduce", "--out", str(tmp_path / "busy")], capsys), "not a study folder")
    assert not (tmp_path / "s").exists()


def test_cache_keys_ignore_fields_left_at_their_defaults():
    from cnnmod.experiments.study import _key, _settings
    from cnnmod.models.train import TrainSettings

    base = TrainSettings(arch="cnn", data="fashion-mnist", epochs=3)
    # a field at its default (as a field added later would be) does not enter the key ...
    assert _settings(base) == {"arch": "cnn", "data": "fashion-mnist", "epochs": 3}
    assert _key(_settings(base)) == _key({"arch": "cnn", "data": "fashion-mnist", "epochs": 3})
    # ... one set away from its default does, and so does every required field
    assert _key(_settings(TrainSettings(arch="cnn", data="fashion-mnist", epochs=3, balanced=True))) != \
        _key(_settings(base))
    assert _key(_settings(TrainSettings(arch="cnn", data="digits", epochs=3))) != _key(_settings(base))


def test_a_study_stopped_while_training_goes_on_after_the_models_last_epoch(tmp_path, datasets, monkeypatch):
    a, b = datasets
    out = tmp_path / "study"
    # the first model's first epoch kept: stopped as by Ctrl-C
    first = ("decomposition",)  # its first step trains the main model; the other parts add nothing to check here
    kept = stop_after_epoch(lambda: Study(out, TINY, (a, b), "FRA", seed=1, device="cpu").run(first), 1, monkeypatch)
    Study(out, TINY, (a, b), "FRA", seed=1, device="cpu").run(first)
    model = kept.with_name(kept.name[:-len(".resume")])
    assert not kept.exists()
    assert read_config(model)["training"]["resumed_after_epoch"] == 1


def test_reproduce_command_writes_results_and_report_and_resumes(tmp_path, datasets, capsys, monkeypatch):
    """``cnnmod reproduce`` through the command line (on the tiny preset, made known for the test): results.json,
    report.md and report.html written, the main and second data sets as given; run again it resumes (every part
    kept, the same figures); with --no-resume a study already there is refused."""
    import json

    from cnnmod.experiments import presets

    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)
    a, b = datasets
    out = tmp_path / "study"
    args = ["reproduce", "--preset", "tiny", "--out", str(out), "--data", a, "--second-data", b, "--seed", "1",
            "--country", "FRA", "--device", "cpu", "--json"]
    rc, stdout, err = run(args, capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    results = json.loads((out / "results.json").read_text())
    assert (results["data"], results["second_data"], results["unfinished"]) == (a, b, [])
    assert summary["report"] == str(out / "report.html") and (out / "report.md").is_file()
    assert summary["intra_reuse_pp"] == results["summary"]["intra_reuse_pp"]
    assert results["command"].startswith("cnnmod reproduce --preset tiny")
    rc, stdout, err = run(args, capsys)
    assert rc == 0, err
    assert "done before, kept" in err
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert_user_error(*run([*args, "--no-resume"], capsys), "holds a study already")
