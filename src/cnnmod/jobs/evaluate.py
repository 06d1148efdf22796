"""``cnnmod evaluate-model`` and ``cnnmod evaluate`` as library calls: folders in, a JSON result out, energy
metered."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import read_config
from ..composition.base import Composer
from ..composition.evaluate import composition_test_sets, evaluate_against_model, evaluate_composition
from ..core.cost import cost_report
from ..core.metrics import evaluate_classifier
from ..errors import UserError
from ..io.store import load_composer, load_source_of
from ..models.classifier import Classifier, test_set_for
from ..models.folder import load_model
from ..modules.kinds import composing_of
from ..progress import say
from ..runtime import init_distributed, pick_device
from .common import Run


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``cnnmod evaluate`` measures: on which data (default: each class's own), with which scores and mode
    (default: as the composition was made), and whether parameters, FLOPs and latency too."""

    data: str | None = None
    calibration: str | None = None
    mode: str | None = None
    cost: bool = True
    latency_batch: int = 64

    def check(self) -> None:
        if self.latency_batch < 1:
            raise UserError(f"«latency_batch» must be at least 1, got {self.latency_batch}")


def evaluate_model_dir(model_dir: str | Path, data: str | None = None, resize: bool = False,
                       run: Run | None = None) -> dict:
    """``cnnmod evaluate-model``: top-1, top-5 and per-class accuracy of a model on a test set."""
    run = run or Run(batch_size=512)
    dd, dev = init_distributed(pick_device(run.device))
    clf = load_model(model_dir)
    test = test_set_for(clf, data, run.data_root, resize)
    started = time.perf_counter()
    with run.meter().phase("evaluation") as spent:  # sharded over torchrun's ranks
        report = evaluate_classifier(clf, test, dev, run.batch_size, dd)
    return {"model": str(model_dir), "data": data or clf.dataset, **report,
            "seconds": round(time.perf_counter() - started, 3), "energy": {"evaluation": spent.record.to_dict()}}


def _one_model(composer: Composer, sources: list[Classifier], paths: list, device) -> Classifier | None:
    """The one source model all of ``composer``'s classes come from (a slim decomposition folder holds it), or
    None when they come from several."""
    if len(set(composer.source_shas)) != 1 or len(sources) > 1:
        return None
    if sources:
        return sources[0]
    return load_source_of(paths[0], device) if len(paths) == 1 else None


def _merges_otherwise(composer: Composer, paths: list) -> bool:
    """Whether ``paths`` is one decomposition folder whose modules, left to vote here, are of a kind that ``cnnmod
    compose`` makes one merged network of (slim modules): what the user would get differs from what is measured."""
    modules = getattr(composer, "modules_list", None)
    merged = composing_of(modules, "merged") if modules else None
    return (len(paths) == 1 and read_config(paths[0])["kind"] == "decomposition" and merged is not None
            and merged.network)


def costs(composer: Composer, images, per_module: bool, sources: list[Classifier]) -> dict:
    """Parameters, FLOPs and latency: of the composition as a whole and, with ``per_module``, the mean over its
    separately run parts (each module against its source model)."""
    out = {"composition": cost_report(composer, images, source=sources)}
    parts = composer.separately() if per_module else None
    if parts:
        reports = [cost_report(alone, images, repeats=3, source=sources) for _, alone in parts]
        out["module_mean"] = {k: round(sum(r[k] for r in reports) / len(reports), 4) for k in reports[0]}
    return out


def evaluate_dir(paths: list[str | Path], settings: EvaluateSettings | None = None, run: Run | None = None) -> dict:
    """``cnnmod evaluate``: a decomposition, composition or module folders: the composition of what they hold on
    its classes' test images; for one model's classes also the model on the same images."""
    s, run = settings or EvaluateSettings(), run or Run(batch_size=512)
    s.check()
    started = time.perf_counter()
    dd, dev = init_distributed(pick_device(run.device))
    with run.meter().phase("evaluation") as spent:  # the scoring sharded over torchrun's ranks
        composer, sources = load_composer(paths, dev, s.calibration, s.mode)
        source = _one_model(composer, sources, paths, dev)
        if s.mode is None and composer.mode == "vote" and _merges_otherwise(composer, paths):
            say("evaluated as the modules voting, one pass each: one network of them all is what `cnnmod compose "
                f"{paths[0]} --out DIR` makes (merged); evaluate DIR for its figures")
        head = {"paths": [str(p) for p in paths]}
        if source is None:
            if s.data is not None:
                raise UserError("«data» applies to modules of one model; a composition across models is evaluated "
                                "on each class's own data set")
            report = evaluate_composition(composer, run.data_root, dev, run.batch_size, dd=dd)
            if composer.mode == "fused":
                head.update({"variant": composer.variant, "modules": len(composer.refs), "parts": len(sources)})
            else:
                head["modules"] = len(composer.refs)
            if s.cost and (sources or composer.sources):  # slim modules saved without their model: no ratio
                images = composition_test_sets(composer.refs, run.data_root)[0][0].images[:s.latency_batch].to(dev)
                report["cost"] = costs(composer, images, False, sources)
        else:
            test = test_set_for(source, s.data, run.data_root, None).subset([r.index for r in composer.refs])
            report = evaluate_against_model(composer, source, test, dev, run.batch_size, dd)
            head.update({"data": s.data or source.dataset, "variant": composer.variant,
                         "modules": len(composer.refs)})
            if s.cost:
                whole = any(read_config(p)["kind"] == "composition" for p in paths)
                report["cost"] = costs(composer, test.images[:s.latency_batch].to(dev), not whole, [source])
    return {**head, "calibration": composer.calibration, "mode": composer.mode, **report,
            "seconds": round(time.perf_counter() - started, 3), "energy": {"evaluation": spent.record.to_dict()}}
