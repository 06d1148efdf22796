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
from dataclasses import MISSING, fields, replace
from pathlib import Path

from ..artifacts import write_json
from ..composition.evaluate import evaluate_against_model, evaluate_composition
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
from ..runtime import pick_device, seed_everything
from .figures import PAPER, summarise
from .presets import Preset

PARTS = ("decomposition", "intra_reuse", "inter_reuse", "intra_replace", "inter_replace", "energy", "dense")


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


class Study:
    def __init__(self, out: str | Path, preset: Preset, data: str = "fashion-mnist", second: str = "digits",
                 country: str | None = None, seed: int = 0, device: str = "auto", data_root: str | None = None,
                 resume: bool = True) -> None:
        self.out, self.p, self.data, self.second = Path(out), preset, data, second
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
                raise UserError(f"{self.out} holds a study already; pass --resume to go on with it, or another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"{self.out} exists and is not a study folder; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(header_path, self.header)

    def _part_path(self, part: str) -> Path:
        return self.out / "parts" / f"{part}.json"

    def _row_path(self, part: str, name: str) -> Path:
        return self.out / "parts" / part / f"{name}.json"

    def _done_row(self, part: str, name: str) -> dict | None:
        """A row of a part that an earlier, interrupted run finished: a resumed run does not compute it again."""
        path = self._row_path(part, name)
        return json.loads(path.read_text()) if path.is_file() else None

    def _keep_row(self, part: str, name: str, row: dict) -> dict:
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
                modules = decompose(clf, train_set, settings=s, device=self.device, show_progress=False)
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
    def part_decomposition(self) -> list[dict]:
        model_dir, energy = self.main_model()
        clf = load_model(model_dir, self.device)
        test = self.test_split(clf)
        rows = []
        for variant in self.p.variants:
            modules, dec_energy = self.decomposition("main", model_dir, variant)
            report = evaluate_against_model(compose(modules), modules[0].source, test, self.device)
            seconds = dec_energy["decomposition"]["seconds"]
            rows.append({"model": f"{self.p.arch} on {self.data}", "variant": variant,
                         **{k: v for k, v in report.items() if k != "per_class"}, "per_class": report["per_class"],
                         "decomposition_seconds": round(seconds, 3),
                         "training_seconds": round(energy["training"]["seconds"], 3),
                         "decomposition_to_training": round(seconds / energy["training"]["seconds"], 6)})
        return rows

    def part_intra_reuse(self) -> list[dict]:
        modules, _ = self.decomposition("main", self.main_model()[0])
        rows = []
        pairs = [(a, b) for i, a in enumerate(self.main_classes) for b in self.main_classes[i + 1:]]
        for a, b in pairs:
            if (done := self._done_row("intra_reuse", f"{a}-{b}")) is not None:
                rows.append(done)
                continue
            tma_dir, train_energy = self.model(f"tma-{a}-{b}", self.train_settings(self.data, self.p.tma_epochs,
                                                                                  self.p.tma_subset, [a, b]))
            chosen, reuse_energy = self.compose_measured([modules[a], modules[b]], f"intra-{a}-{b}")
            refit, refit_energy = self.compose_measured([modules[a], modules[b]], f"intra-refit-{a}-{b}", refit=True)
            tma, ma, ma_refit = self.tma(tma_dir), self.composed(chosen), self.composed(refit)
            rows.append(self._keep_row("intra_reuse", f"{a}-{b}", {
                         "classes": [a, b], "names": [modules[a].class_name, modules[b].class_name],
                         "tma": tma["top1"], "ma": ma["top1"], "delta_pp": round(ma["top1"] - tma["top1"], 4),
                         "ma_refit": ma_refit["top1"], "delta_refit_pp": round(ma_refit["top1"] - tma["top1"], 4),
                         "training_energy": train_energy, "reuse_energy": reuse_energy,
                         "reuse_refit_energy": refit_energy}))
        return rows

    def part_inter_reuse(self) -> list[dict]:
        modules, _ = self.decomposition("main", self.main_model()[0])
        second, _ = self.decomposition("second", self.second_model()[0])
        rows = []
        for a in self.main_classes:
            for b in self.second_classes:
                if (done := self._done_row("inter_reuse", f"{a}-x{b}")) is not None:
                    rows.append(done)
                    continue
                spec = f"{self.data}:{a}+{self.second}:{b}"
                tma_dir, train_energy = self.model(f"tma-{a}-x{b}", self.train_settings(
                    spec, self.p.tma_epochs, self.p.tma_subset))
                plain, reuse_energy = self.compose_measured([modules[a], second[b]], f"inter-{a}-x{b}")
                learned, cl_energy = self.compose_measured([modules[a], second[b]], f"inter-cl-{a}-x{b}", True)
                refit, refit_energy = self.compose_measured([modules[a], second[b]], f"inter-refit-{a}-x{b}", True,
                                                            refit=True)
                tma, ma, mma = self.tma(tma_dir), self.composed(plain), self.composed(learned)
                mma_refit, mma_refit_cal = self.composed(refit), self.composed(refit, "platt")
                ma_cal, mma_cal = self.composed(plain, "platt"), self.composed(learned, "platt")
                ma_ood = self.composed(plain, "platt-ood")
                names = [f"{self.data}:{modules[a].class_name}", f"{self.second}:{second[b].class_name}"]
                rows.append(self._keep_row("inter_reuse", f"{a}-x{b}", {"classes": names,
                             "tma": tma["top1"], "ma": ma["top1"], "mma": mma["top1"],
                             "tma_balanced": tma["balanced_top1"], "ma_balanced": ma["balanced_top1"],
                             "mma_balanced": mma["balanced_top1"],
                             "delta_pp": round(ma["top1"] - tma["top1"], 4),
                             "delta_cl_pp": round(mma["top1"] - tma["top1"], 4),
                             "ma_calibrated": ma_cal["top1"], "mma_calibrated": mma_cal["top1"],
                             "delta_calibrated_pp": round(ma_cal["top1"] - tma["top1"], 4),
                             "delta_cl_calibrated_pp": round(mma_cal["top1"] - tma["top1"], 4),
                             "mma_refit": mma_refit["top1"], "mma_refit_balanced": mma_refit["balanced_top1"],
                             "delta_refit_pp": round(mma_refit["top1"] - tma["top1"], 4),
                             "mma_refit_calibrated": mma_refit_cal["top1"],
                             "delta_refit_calibrated_pp": round(mma_refit_cal["top1"] - tma["top1"], 4),
                             "ma_ood": ma_ood["top1"], "delta_ood_pp": round(ma_ood["top1"] - tma["top1"], 4),
                             "training_energy": train_energy, "reuse_energy": reuse_energy,
                             "reuse_cl_energy": cl_energy, "reuse_refit_energy": refit_energy}))
        return rows

    def part_intra_replace(self) -> list[dict]:
        strong, _ = self.decomposition("main", self.main_model()[0])
        weak, _ = self.decomposition("weak", self.weak_model()[0])
        prior, prior_cal = self.composed(weak), self.composed(weak, "platt")
        prior_ood = self.composed(weak, "platt-ood")
        rows = []
        for c in range(len(weak)):
            if (done := self._done_row("intra_replace", str(c))) is not None:
                rows.append(done)
                continue
            swapped = list(weak)
            swapped[c] = strong[c]
            swapped, energy = self.compose_measured(swapped, f"intra-replace-{c}")
            after, after_cal = self.composed(swapped), self.composed(swapped, "platt")
            after_ood = self.composed(swapped, "platt-ood")
            rows.append(self._keep_row("intra_replace", str(c), {
                         "class": c, "name": weak[c].class_name, "prior_top1": prior["top1"], "top1": after["top1"],
                         "prior_top5": prior["top5"], "top5": after["top5"],
                         "gain_top1_pp": round(after["top1"] - prior["top1"], 4),
                         "gain_top5_pp": round(after["top5"] - prior["top5"], 4),
                         "prior_top1_calibrated": prior_cal["top1"], "top1_calibrated": after_cal["top1"],
                         "gain_top1_calibrated_pp": round(after_cal["top1"] - prior_cal["top1"], 4),
                         "prior_top1_ood": prior_ood["top1"], "top1_ood": after_ood["top1"],
                         "gain_top1_ood_pp": round(after_ood["top1"] - prior_ood["top1"], 4),
                         "replace_energy": energy}))
        return rows

    def part_inter_replace(self) -> list[dict]:
        main_dir = self.main_model()[0]
        modules, _ = self.decomposition("main", main_dir)
        second, _ = self.decomposition("second", self.second_model()[0])
        rows = []
        for a in self.main_classes:
            for b in self.second_classes:
                if (done := self._done_row("inter_replace", f"{a}-x{b}")) is not None:
                    rows.append(done)
                    continue
                swapped = list(modules)
                swapped[a] = second[b]
                swapped, energy = self.compose_measured(swapped, f"inter-replace-{a}-x{b}")
                kept = [c for c in range(len(modules)) if c != a]
                spec = f"{self.data}:{','.join(map(str, kept))}+{self.second}:{b}"
                tma_dir, train_energy = self.model(f"tma-replace-{a}-x{b}", self.train_settings(
                    spec, self.p.tma_epochs, self.p.tma_subset))
                refit, refit_energy = self.compose_measured(swapped, f"inter-replace-refit-{a}-x{b}", refit=True)
                tma, ma, ma_cal = self.tma(tma_dir), self.composed(swapped), self.composed(swapped, "platt")
                ma_refit = self.composed(refit)
                ma_ood = self.composed(swapped, "platt-ood")
                rows.append(self._keep_row("inter_replace", f"{a}-x{b}", {
                             "replaced": f"{self.data}:{modules[a].class_name}",
                             "with": f"{self.second}:{second[b].class_name}",
                             "tma_top1": tma["top1"], "top1": ma["top1"], "tma_top5": tma["top5"], "top5": ma["top5"],
                             "delta_top1_pp": round(ma["top1"] - tma["top1"], 4),
                             "delta_top5_pp": round(ma["top5"] - tma["top5"], 4),
                             "top1_calibrated": ma_cal["top1"],
                             "delta_top1_calibrated_pp": round(ma_cal["top1"] - tma["top1"], 4),
                             "top1_ood": ma_ood["top1"], "delta_top1_ood_pp": round(ma_ood["top1"] - tma["top1"], 4),
                             "top1_refit": ma_refit["top1"],
                             "delta_top1_refit_pp": round(ma_refit["top1"] - tma["top1"], 4),
                             "training_energy": train_energy, "replace_energy": energy,
                             "replace_refit_energy": refit_energy}))
        return rows

    def part_energy(self, results: dict) -> list[dict]:
        """Per scenario: training from scratch against reuse, from the figures measured in the other parts."""
        decomposition = {name: self.decomposition(name, model)[1]["decomposition"]
                         for name, model in (("main", self.main_model()[0]), ("second", self.second_model()[0]),
                                             ("weak", self.weak_model()[0]))}
        rows = []
        scenarios = (("intra_reuse", "reuse_energy", ["main"]), ("inter_reuse", "reuse_energy", ["main", "second"]),
                     ("inter_reuse (continuous learning)", "reuse_cl_energy", ["main", "second"]),
                     ("inter_reuse (heads refitted)", "reuse_refit_energy", ["main", "second"]),
                     ("intra_replace", "replace_energy", ["main", "weak"]),
                     ("inter_replace", "replace_energy", ["main", "second"]))
        for label, key, sources in scenarios:
            part = results.get(label.split(" ")[0]) or []
            with_training = [r for r in part if "training_energy" in r]
            reused = [r[key]["kg_co2e"] for r in part if key in r]
            reuse = _mean(reused)
            reuse_kwh = _mean([r[key]["kwh"] for r in part if key in r])
            one_time = sum(decomposition[s]["kg_co2e"] for s in sources)
            if label == "intra_replace":  # the alternative to replacing modules: training a better model anew
                main_energy = self.main_model()[1]
                train_kg = main_energy["training"]["kg_co2e"]
                best_kg = main_energy["training_to_best_epoch"]["kg_co2e"]
                trained = [train_kg]  # once, for every replacement
            else:
                trained = [r["training_energy"]["training"]["kg_co2e"] for r in with_training]
                train_kg = _mean(trained)
                best_kg = _mean([r["training_energy"]["training_to_best_epoch"]["kg_co2e"] for r in with_training])
            rows.append({"scenario": label, "training_kg_co2e": train_kg, "training_to_best_kg_co2e": best_kg,
                         "reuse_kg_co2e": reuse, "reuse_kwh": reuse_kwh, "decomposition_kg_co2e_once": one_time,
                         "ratio_training_to_reuse": train_kg / reuse if reuse else None,
                         "ratio_best_epoch_to_reuse": best_kg / reuse if reuse else None,
                         "ratio_training_to_reuse_with_decomposition":
                             train_kg / (reuse + one_time) if reuse is not None else None,
                         # the scenario as a whole: every model it trained from scratch against every composition
                         # it built plus the one decomposition of each source that all of them share
                         "models_trained": len(trained), "compositions": len(reused),
                         "ratio_all_training_to_all_reuse_with_decomposition":
                             sum(trained) / (sum(reused) + one_time) if reused and trained else None,
                         "power": self.meter.records[-1].power if self.meter.records else None,
                         "tracker": self.meter.backend})
        return rows

    def part_dense(self) -> list[dict]:
        rows = []
        for layers in range(1, 5):
            s = replace(self.train_settings(self.data, self.p.dense_epochs, None), arch="mlp",
                        arch_args={"hidden": [49] * layers}, optimizer="adam")
            model_dir, _ = self.model(f"mlp-{layers}x49", s)
            clf = load_model(model_dir, self.device)
            test = split_for(clf, None, self.data_root, "test")
            for variant in ("mc", "mc-bln"):
                modules, _ = self.decomposition(f"mlp-{layers}x49", model_dir, variant)
                r = evaluate_against_model(compose(modules), modules[0].source, test, self.device)
                rows.append({"hidden_layers": layers, "variant": variant, "model_top1": r["model_top1"],
                             "composed_top1": r["composed_top1"], "delta_pp": r["decomposition_cost_top1_pp"],
                             "jaccard": r["jaccard_model_mean"],
                             "paper_model_top1": PAPER["dense_model"][layers - 1],
                             "paper_composed_top1": PAPER["dense_composed"][layers - 1]})
        return rows

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
                results[part] = json.loads(path.read_text())
                say(f"[{self.p.name}] {part}: done before, kept")
                continue
            if on_part is not None and results:  # the report so far, before a part that may take hours
                on_part(self._results(results, parts, started))
            t0 = time.perf_counter()
            say(f"[{self.p.name}] {part} ...")
            rows = self.part_energy(results) if part == "energy" else getattr(self, f"part_{part}")()
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
