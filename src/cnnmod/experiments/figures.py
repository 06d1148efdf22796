"""The study's headline figures, defined once: each one's key (in results.json's ``summary``), label (in the
report), the part and row column it averages, and the paper's value where the paper gives one. The summary,
results.json's ``paper`` and the report's tables and chart are all read off :data:`FIGURES`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    part: str                                   # the study's part whose rows it averages
    column: str                                 # the row's column averaged
    where: tuple[str, tuple[str, ...]] | None = None   # only rows whose column (first) is one of these values
    paper: float | None = None                  # Pan & Rajan's figure, where they give one

    def value(self, results: dict) -> float | None:
        """The mean of ``column`` over the part's rows (those ``where`` keeps), skipping rows without it."""
        rows = results.get(self.part, [])
        if self.where is not None:
            rows = [r for r in rows if r.get(self.where[0]) in self.where[1]]
        values = [r.get(self.column) for r in rows]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None


_MC_BLN = ("variant", ("mc-bln",))
_REUSE = ("scenario", ("intra_reuse", "inter_reuse"))
_REPLACE = ("scenario", ("intra_replace", "inter_replace"))
_WHOLE = "ratio_all_training_to_all_reuse_with_decomposition"

FIGURES: tuple[Figure, ...] = (
    Figure("top1_change_pp", "top-1 change by decomposition (pp; negative: a loss)", "decomposition",
           "top1_change_pp", _MC_BLN, -1.77),
    Figure("top5_change_pp", "top-5 change by decomposition (pp; negative: a loss)", "decomposition",
           "top5_change_pp", _MC_BLN, -0.85),
    Figure("intra_reuse_pp", "intra-data-set reuse, MA - TMA (pp)", "intra_reuse", "delta_pp", paper=2.5),
    Figure("inter_reuse_pp", "inter-data-set reuse, MA - TMA (pp)", "inter_reuse", "delta_pp", paper=-12.06),
    Figure("inter_reuse_cl_pp", "inter-data-set reuse with continuous learning (pp)", "inter_reuse", "delta_cl_pp",
           paper=-7.63),
    Figure("inter_reuse_calibrated_pp", "inter-data-set reuse, calibrated scores (pp; ours)", "inter_reuse",
           "delta_calibrated_pp"),
    Figure("inter_reuse_ood_pp", "inter-data-set reuse, calibrated + in-distribution test (pp; ours)",
           "inter_reuse", "delta_ood_pp"),
    Figure("inter_reuse_cl_calibrated_pp", "inter-data-set reuse, CL + calibrated (pp; ours)", "inter_reuse",
           "delta_cl_calibrated_pp"),
    Figure("inter_reuse_refit_pp", "inter-data-set reuse, CL + heads refitted (pp; ours)", "inter_reuse",
           "delta_refit_pp"),
    Figure("inter_reuse_refit_calibrated_pp", "inter-data-set reuse, CL + heads refitted, calibrated (pp; ours)",
           "inter_reuse", "delta_refit_calibrated_pp"),
    Figure("intra_reuse_refit_pp", "intra-data-set reuse, heads refitted (pp; ours)", "intra_reuse",
           "delta_refit_pp"),
    Figure("intra_replace_top1_pp", "intra-data-set replace, top-1 gain (pp)", "intra_replace", "gain_top1_pp",
           paper=0.7),
    Figure("intra_replace_top5_pp", "intra-data-set replace, top-5 gain (pp)", "intra_replace", "gain_top5_pp",
           paper=1.0),
    Figure("intra_replace_top1_calibrated_pp", "intra-data-set replace, calibrated, top-1 gain (pp; ours)",
           "intra_replace", "gain_top1_calibrated_pp"),
    Figure("intra_replace_top1_ood_pp",
           "intra-data-set replace, calibrated + in-distribution test, top-1 gain (pp; ours)", "intra_replace",
           "gain_top1_ood_pp"),
    Figure("inter_replace_top1_pp", "inter-data-set replace vs TMA, top-1 (pp)", "inter_replace", "delta_top1_pp",
           paper=2.5),
    Figure("inter_replace_top5_pp", "inter-data-set replace vs TMA, top-5 (pp)", "inter_replace", "delta_top5_pp",
           paper=-7.1),
    Figure("inter_replace_top1_calibrated_pp", "inter-data-set replace, calibrated, top-1 (pp; ours)",
           "inter_replace", "delta_top1_calibrated_pp"),
    Figure("inter_replace_top1_ood_pp", "inter-data-set replace, calibrated + in-distribution test, top-1 (pp; ours)",
           "inter_replace", "delta_top1_ood_pp"),
    Figure("inter_replace_top1_refit_pp", "inter-data-set replace, heads refitted, top-1 (pp; ours)",
           "inter_replace", "delta_top1_refit_pp"),
    Figure("co2_reuse_ratio_with_decomposition", "CO2e, all training / (all reuse + the decomposition) (x)",
           "energy", _WHOLE, _REUSE),
    Figure("co2_replace_ratio_with_decomposition", "CO2e, all training / (all replace + the decomposition) (x)",
           "energy", _WHOLE, _REPLACE),
    Figure("co2_reuse_break_even", "compositions one decomposition must serve before reuse saves CO2e", "energy",
           "break_even_compositions", _REUSE),
    Figure("co2_replace_break_even", "replacements one decomposition must serve before they save CO2e", "energy",
           "break_even_compositions", _REPLACE),
    Figure("co2_reuse_ratio", "CO2e, training / one reuse, the decomposition left out (x)", "energy",
           "ratio_training_to_reuse", _REUSE, 23.7),
    Figure("co2_replace_ratio", "CO2e, training / one replace, the decomposition left out (x)", "energy",
           "ratio_training_to_reuse", _REPLACE, 42.0),
    Figure("jaccard", "mean Jaccard index, module vs model", "decomposition", "jaccard_model_mean", _MC_BLN, 0.63),
)

# The paper's dense-network table (1 to 4 hidden layers): the model's and the composed accuracy.
PAPER_DENSE = {"dense_model": [85.82, 87.58, 87.09, 87.79], "dense_composed": [85.85, 87.56, 87.10, 87.95]}
PAPER = {**{f.key: f.paper for f in FIGURES if f.paper is not None}, **PAPER_DENSE}


def summarise(results: dict) -> dict:
    """Every figure of :data:`FIGURES` from the study's results so far (None where its part has not run)."""
    return {f.key: f.value(results) for f in FIGURES}
