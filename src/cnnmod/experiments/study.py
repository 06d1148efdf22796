"""The paper's whole study as one run of library calls (``cnnmod reproduce``).

Parts (rows of ``results.json``): ``decomposition``, ``intra_reuse``, ``inter_reuse``, ``intra_replace``,
``inter_replace``, ``energy``, ``dense``. Every trained model and every decomposition is cached under the
study's folder by its settings, every finished part is saved, so an interrupted run resumes where it stopped.
Energy is measured for every phase by one meter; the figures of a cached phase are kept with it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import MISSING, fields
from pathlib import Path

from ..artifacts import write_json
from ..composition.evaluate import evaluate_composition
from ..composition.voting import compose
from ..core.metrics import evaluate_classifier
from ..data import ImageSet, load
from ..energy import EnergyMeter, training_energy
from ..errors import UserError
from ..io.store import load_modules, save_composition, save_decomposition
from ..jobs.train import train
from ..models.classifier import split_for
from ..models.folder import load_model
from ..models.train import TrainSettings
from ..node.method import DecomposeSettings, decompose
from ..node.module import Module
from ..progress import say
from ..reuse import continuous_learning, refit_composition
from ..runtime import Passes, pick_device, seed_everything
from .figures import PAPER, summarise
from .parts import PART_RUNS
from .presets import Preset

PARTS = tuple(PART_RUNS)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _settings(s) -> dict:
    """A settings dataclass as the fields that differ from their defaults: a field added later (with a default
    that keeps the old behaviour) leaves the keys of cached models and decompositions as they were."""
    out = {}
    for f in fields(s):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(s, f.name)
        if f.default is MISSING and f.default_factory is MISSING or value != default:
            out[f.name] = value
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


RENAMED = {"decomposition_cost_top1_pp": "top1_change_pp", "decomposition_cost_top5_pp": "top5_change_pp"}


def upgraded(rows):
    """A part's rows cached by an earlier cnnmod, with the keys renamed since (the figures are the same)."""
    if isinstance(rows, list):
        return [{RENAMED.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r for r in rows]
    return rows


class Study:
    """The paper's study in folder ``out``, with ``preset``'s models and sizes, on the main and second data sets
    ``data`` (names), energy's carbon intensity of ``country``; ``resume`` goes on with a study already there."""

    def __init__(self, out: str | Path, preset: Preset, data: tuple[str, str] = ("fashion-mnist", "digits"),
                 country: str | None = None, seed: int = 0, device: str = "auto", data_root: str | None = None,
                 resume: bool = True) -> None:
        self.out, self.p, (self.data, self.second) = Path(out), preset, data
        second = self.second
        data = self.data
        self.seed, self.data_root = seed, data_root
        self.scores: dict = {}  # each module's test scores, computed once (evaluate_composition's cache)
        self.device = pick_device(device)
        self.meter = EnergyMeter(country)
        self.header = json.loads(json.dumps({"preset": preset.to_dict(), "data": data, "second_data": second,
                                             "seed": seed, "country": self.meter.country}))
        self._check_folder(resume)
        self.train_set = load(data, "train", data_root)
        self.second_train = load(second, "train", data_root)
        rng = random.Random(seed)
        k = preset.reuse_classes
        self.main_classes = sorted(rng.sample(range(self.train_set.num_classes), k))
        self.second_classes = sorted(rng.sample(range(self.second_train.num_classes), k))

    # ------------------------------------------------------------------ folder and cache
    def _check_folder(self, resume: bool) -> None:
        header_path = self.out / "study.json"
        if header_path.is_file():
            recorded = json.loads(header_path.read_text())
            if recorded != self.header:
                diff = [k for k in self.header if recorded.get(k) != self.header[k]]
                raise UserError(f"{self.out} holds a study of other settings ({', '.join(diff)}: e.g. preset "
                                f"{recorded.get('preset', {}).get('name')!r}); choose another --out or remove it")
            if not resume:
                raise UserError(f"{self.out} holds a study already; pass «resume» to go on with it, or another «out»")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"{self.out} exists and is not a study folder; choose another «out»")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(header_path, self.header)

    def _part_path(self, part: str) -> Path:
        return self.out / "parts" / f"{part}.json"

    def _row_path(self, part: str, name: str) -> Path:
        return self.out / "parts" / part / f"{name}.json"

    def done_row(self, part: str, name: str) -> dict | None:
        """A row of a part that an earlier, interrupted run finished: a resumed run does not compute it again."""
        path = self._row_path(part, name)
        return json.loads(path.read_text()) if path.is_file() else None

    def keep_row(self, part: str, name: str, row: dict) -> dict:
        write_json(self._row_path(part, name), row)
        return row

    def _part_seconds(self) -> dict[str, float]:
        """Wall-clock seconds of the run that finished each part. Models an earlier, interrupted run had trained
        were cached and are not counted again here; their own seconds are in their energy records."""
        path = self.out / "parts" / "seconds.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record_seconds(self, part: str, seconds: float) -> None:
        recorded = self._part_seconds()
        recorded[part] = round(seconds, 1)
        write_json(self.out / "parts" / "seconds.json", recorded)

    def model(self, name: str, s: TrainSettings) -> tuple[Path, dict]:
        """A trained model (cached by its settings) and the energy its training took."""
        folder = self.out / "models" / f"{name}-{_key(_settings(s))}"
        energy_path = folder / "energy.json"
        if energy_path.is_file():
            return folder, json.loads(energy_path.read_text())
        say(f"[{self.p.name}] training {name}: {s.arch} on {s.data}" + (f" {s.classes}" if s.classes else ""))
        with self.meter.phase(f"training {name}") as m:
            # a baseline whose training stopped goes on after its last finished epoch (its folder is its settings')
            result = train(s, folder, overwrite=True, show_progress=False, resume=True)
        energy = training_energy(m.record, result["history"], result["best_epoch"],
                                 result.get("resumed_after_epoch", 0))
        write_json(energy_path, energy)
        return folder, energy

    def train_settings(self, data: str, epochs: int, subset: int | None, classes: list[int] | None = None,
                       input_size: list[int] | None = None) -> TrainSettings:
        # a baseline on joined data sets (a few hundred digits beside thousands of Fashion-MNIST images) is
        # trained class-balanced: otherwise it learns to ignore the small data set's classes
        return TrainSettings(arch=self.p.arch, data=data, arch_args=dict(self.p.arch_args), classes=classes,
                             subset=subset, epochs=epochs, optimizer=self.p.optimizer, seed=self.seed,
                             device=str(self.device), data_root=self.data_root, input_size=input_size,
                             balanced="+" in data)

    def decomposition(self, name: str, model_dir: Path, variant: str = "mc-bln") -> tuple[list[Module], dict]:
        """Modules of a model (cached by model and settings) and the energy decomposing took."""
        s = DecomposeSettings(variant=variant, ci_samples=self.p.ci_samples, seed=self.seed)
        # "typical": modules made before the in-distribution test (platt-ood) lack it: decompose those again
        key = _key({"model": str(model_dir), **_settings(s), "typical": 1})
        folder = self.out / "decompositions" / f"{name}-{variant}-{key}"
        energy_path = folder / "energy.json"
        if not energy_path.is_file():
            clf = load_model(model_dir, self.device)
            train_set = split_for(clf, None, self.data_root, "train")
            with self.meter.phase(f"decomposition {name}") as m:
                modules = decompose(clf, train_set, settings=s, passes=Passes(self.device, progress=False))
            save_decomposition(modules, folder, overwrite=True)
            write_json(energy_path, {"decomposition": m.record.to_dict()})
        return load_modules(folder, self.device), json.loads(energy_path.read_text())

    def compose_measured(self, modules: list[Module], name: str, relearn: bool = False,
                         refit: bool = False) -> tuple[list[Module], dict]:
        """Build (and save) a composition, with continuous learning and the heads refitted (beyond the paper)
        when asked: the cost of reuse."""
        folder = self.out / "compositions" / name
        with self.meter.phase(f"composition {name}") as m:
            if relearn:
                modules = continuous_learning(modules, self.data_root, self.device, refit=refit)
            elif refit:
                modules = refit_composition(modules, self.data_root)
            save_composition(modules, folder, overwrite=True)
        return modules, m.record.to_dict()

    def test_split(self, clf) -> ImageSet:
        """A model's test split, capped at the preset's images per class."""
        test = split_for(clf, None, self.data_root, "test")
        return test.first_per_class(self.p.test_per_class) if self.p.test_per_class is not None else test

    def tma(self, model_dir: Path) -> dict:
        clf = load_model(model_dir, self.device)
        test = self.test_split(clf)
        report = evaluate_classifier(clf, test, self.device)
        return {"top1": report["top1"], "top5": report["top5"],
                "balanced_top1": _mean([c["top1"] for c in report["per_class"]])}

    def composed(self, modules: list[Module], calibration: str = "none") -> dict:
        r = evaluate_composition(compose(modules, calibration=calibration), self.data_root, self.device,
                                 per_class=self.p.test_per_class, cache=self.scores)
        return {"top1": r["composed_top1"], "top5": r["composed_top5"], "balanced_top1": r["composed_balanced_top1"]}

    # ------------------------------------------------------------------ the models everything starts from
    def main_model(self) -> tuple[Path, dict]:
        return self.model("main", self.train_settings(self.data, self.p.epochs, self.p.subset))

    def weak_model(self) -> tuple[Path, dict]:
        return self.model("weak", self.train_settings(self.data, self.p.weak_epochs, self.p.weak_subset))

    def second_model(self) -> tuple[Path, dict]:
        size = list(self.train_set.input_shape[1:])
        return self.model("second", self.train_settings(self.second, self.p.second_epochs, None, input_size=size))

    # ------------------------------------------------------------------ the parts
    # ------------------------------------------------------------------ running
    def run(self, parts: tuple[str, ...] = PARTS, on_part=None) -> dict:
        """Run (or resume) the study's parts; ``on_part(results)`` is called with the results so far after each
        part that was computed (their ``unfinished`` lists the parts still to come), and at the end."""
        seed_everything(self.seed)
        started = time.perf_counter()
        results: dict = {}
        for part in parts:
            path = self._part_path(part)
            if path.is_file():
                results[part] = upgraded(json.loads(path.read_text()))
                say(f"[{self.p.name}] {part}: done before, kept")
                continue
            if on_part is not None and results:  # the report so far, before a part that may take hours
                on_part(self._results(results, parts, started))
            t0 = time.perf_counter()
            say(f"[{self.p.name}] {part} ...")
            rows = PART_RUNS[part](self, results)
            write_json(path, rows)
            results[part] = rows
            seconds = time.perf_counter() - t0
            self._record_seconds(part, seconds)
            say(f"[{self.p.name}] {part}: {seconds:.0f} s")
        out = self._results(results, parts, started)
        if on_part is not None:
            on_part(out)
        return out

    def _results(self, results: dict, parts: tuple[str, ...], started: float) -> dict:
        part_seconds = self._part_seconds()
        out = {**self.header, "main_classes": self.main_classes, "second_classes": self.second_classes,
               "paper": PAPER, "summary": summarise(results), **results,
               "unfinished": [p for p in parts if p not in results],
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "part_seconds": part_seconds, "seconds_all_runs": round(sum(part_seconds.values()), 1)}
        write_json(self.out / "results.json", out)
        return out
