"""The study's parts, each a function of the :class:`~cnnmod.experiments.study.Study` that runs it (this module
never imports it: the study looks its parts up here) and of the results of the parts before it, returning its rows:
decomposition cost, reuse and replacement within and across data sets, energy, and the paper's dense-network
table."""

from __future__ import annotations

import math
from dataclasses import replace

from ..composition.evaluate import evaluate_against_model
from ..composition.voting import compose
from ..models.classifier import split_for
from ..models.folder import load_model
from .figures import PAPER


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def decomposition(study, results: dict) -> list[dict]:
    model_dir, energy = study.main_model()
    clf = load_model(model_dir, study.device)
    test = study.test_split(clf)
    rows = []
    for variant in study.p.variants:
        modules, dec_energy = study.decomposition("main", model_dir, variant)
        report = evaluate_against_model(compose(modules), modules[0].source, test, study.device)
        seconds = dec_energy["decomposition"]["seconds"]
        rows.append({"model": f"{study.p.arch} on {study.data}", "variant": variant,
                     **{k: v for k, v in report.items() if k != "per_class"}, "per_class": report["per_class"],
                     "decomposition_seconds": round(seconds, 3),
                     "training_seconds": round(energy["training"]["seconds"], 3),
                     "decomposition_to_training": round(seconds / energy["training"]["seconds"], 6)})
    return rows

def intra_reuse(study, results: dict) -> list[dict]:
    modules, _ = study.decomposition("main", study.main_model()[0])
    rows = []
    pairs = [(a, b) for i, a in enumerate(study.main_classes) for b in study.main_classes[i + 1:]]
    for a, b in pairs:
        if (done := study.done_row("intra_reuse", f"{a}-{b}")) is not None:
            rows.append(done)
            continue
        tma_dir, train_energy = study.model(f"tma-{a}-{b}", study.train_settings(study.data, study.p.tma_epochs,
                                                                              study.p.tma_subset, [a, b]))
        chosen, reuse_energy = study.compose_measured([modules[a], modules[b]], f"intra-{a}-{b}")
        refit, refit_energy = study.compose_measured([modules[a], modules[b]], f"intra-refit-{a}-{b}", refit=True)
        tma, ma, ma_refit = study.tma(tma_dir), study.composed(chosen), study.composed(refit)
        rows.append(study.keep_row("intra_reuse", f"{a}-{b}", {
                     "classes": [a, b], "names": [modules[a].class_name, modules[b].class_name],
                     "tma": tma["top1"], "ma": ma["top1"], "delta_pp": round(ma["top1"] - tma["top1"], 4),
                     "ma_refit": ma_refit["top1"], "delta_refit_pp": round(ma_refit["top1"] - tma["top1"], 4),
                     "training_energy": train_energy, "reuse_energy": reuse_energy,
                     "reuse_refit_energy": refit_energy}))
    return rows

def inter_reuse(study, results: dict) -> list[dict]:
    modules, _ = study.decomposition("main", study.main_model()[0])
    second, _ = study.decomposition("second", study.second_model()[0])
    rows = []
    for a in study.main_classes:
        for b in study.second_classes:
            if (done := study.done_row("inter_reuse", f"{a}-x{b}")) is not None:
                rows.append(done)
                continue
            spec = f"{study.data}:{a}+{study.second}:{b}"
            tma_dir, train_energy = study.model(f"tma-{a}-x{b}", study.train_settings(
                spec, study.p.tma_epochs, study.p.tma_subset))
            plain, reuse_energy = study.compose_measured([modules[a], second[b]], f"inter-{a}-x{b}")
            learned, cl_energy = study.compose_measured([modules[a], second[b]], f"inter-cl-{a}-x{b}", True)
            refit, refit_energy = study.compose_measured([modules[a], second[b]], f"inter-refit-{a}-x{b}", True,
                                                        refit=True)
            tma, ma, mma = study.tma(tma_dir), study.composed(plain), study.composed(learned)
            mma_refit, mma_refit_cal = study.composed(refit), study.composed(refit, "platt")
            ma_cal, mma_cal = study.composed(plain, "platt"), study.composed(learned, "platt")
            ma_ood = study.composed(plain, "platt-ood")
            names = [f"{study.data}:{modules[a].class_name}", f"{study.second}:{second[b].class_name}"]
            rows.append(study.keep_row("inter_reuse", f"{a}-x{b}", {"classes": names,
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

def intra_replace(study, results: dict) -> list[dict]:
    strong, _ = study.decomposition("main", study.main_model()[0])
    weak, _ = study.decomposition("weak", study.weak_model()[0])
    prior, prior_cal = study.composed(weak), study.composed(weak, "platt")
    prior_ood = study.composed(weak, "platt-ood")
    rows = []
    for c in range(len(weak)):
        if (done := study.done_row("intra_replace", str(c))) is not None:
            rows.append(done)
            continue
        swapped = list(weak)
        swapped[c] = strong[c]
        swapped, energy = study.compose_measured(swapped, f"intra-replace-{c}")
        after, after_cal = study.composed(swapped), study.composed(swapped, "platt")
        after_ood = study.composed(swapped, "platt-ood")
        rows.append(study.keep_row("intra_replace", str(c), {
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

def inter_replace(study, results: dict) -> list[dict]:
    main_dir = study.main_model()[0]
    modules, _ = study.decomposition("main", main_dir)
    second, _ = study.decomposition("second", study.second_model()[0])
    rows = []
    for a in study.main_classes:
        for b in study.second_classes:
            if (done := study.done_row("inter_replace", f"{a}-x{b}")) is not None:
                rows.append(done)
                continue
            swapped = list(modules)
            swapped[a] = second[b]
            swapped, energy = study.compose_measured(swapped, f"inter-replace-{a}-x{b}")
            kept = [c for c in range(len(modules)) if c != a]
            spec = f"{study.data}:{','.join(map(str, kept))}+{study.second}:{b}"
            tma_dir, train_energy = study.model(f"tma-replace-{a}-x{b}", study.train_settings(
                spec, study.p.tma_epochs, study.p.tma_subset))
            refit, refit_energy = study.compose_measured(swapped, f"inter-replace-refit-{a}-x{b}", refit=True)
            tma, ma, ma_cal = study.tma(tma_dir), study.composed(swapped), study.composed(swapped, "platt")
            ma_refit = study.composed(refit)
            ma_ood = study.composed(swapped, "platt-ood")
            rows.append(study.keep_row("inter_replace", f"{a}-x{b}", {
                         "replaced": f"{study.data}:{modules[a].class_name}",
                         "with": f"{study.second}:{second[b].class_name}",
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

def energy(study, results: dict) -> list[dict]:
    """Per scenario: training from scratch against reuse, from the figures measured in the other parts."""
    decomposition = {name: study.decomposition(name, model)[1]["decomposition"]
                     for name, model in (("main", study.main_model()[0]), ("second", study.second_model()[0]),
                                         ("weak", study.weak_model()[0]))}
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
            main_energy = study.main_model()[1]
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
                     # how many compositions the one decomposition must serve before reuse saves CO2e: each saves
                     # training less reuse, the decomposition is paid once
                     "break_even_compositions": math.ceil(one_time / (train_kg - reuse))
                         if reuse is not None and train_kg is not None and train_kg > reuse else None,
                     "power": study.meter.records[-1].power if study.meter.records else None,
                     "tracker": study.meter.backend})
    return rows

def dense(study, results: dict) -> list[dict]:
    rows = []
    for layers in range(1, 5):
        s = replace(study.train_settings(study.data, study.p.dense_epochs, None), arch="mlp",
                    arch_args={"hidden": [49] * layers}, optimizer="adam")
        model_dir, _ = study.model(f"mlp-{layers}x49", s)
        clf = load_model(model_dir, study.device)
        test = split_for(clf, None, study.data_root, "test")
        for variant in ("mc", "mc-bln"):
            modules, _ = study.decomposition(f"mlp-{layers}x49", model_dir, variant)
            r = evaluate_against_model(compose(modules), modules[0].source, test, study.device)
            rows.append({"hidden_layers": layers, "variant": variant, "model_top1": r["model_top1"],
                         "composed_top1": r["composed_top1"], "delta_pp": r["top1_change_pp"],
                         "jaccard": r["jaccard_model_mean"],
                         "paper_model_top1": PAPER["dense_model"][layers - 1],
                         "paper_composed_top1": PAPER["dense_composed"][layers - 1]})
    return rows


# every part, by its name in results.json, in the order a study runs them
PART_RUNS = {"decomposition": decomposition, "intra_reuse": intra_reuse, "inter_reuse": inter_reuse,
             "intra_replace": intra_replace, "inter_replace": inter_replace, "energy": energy, "dense": dense}
