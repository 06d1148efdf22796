"""The study's report: ``report.md`` (tables) and a self-contained ``report.html`` (tables and plots as embedded
PNG images), each figure beside the paper's."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..energy import co2_text
from .figures import FIGURES

PLOTS_EXTRA = "pip install 'cnnmod[report]'"  # what brings matplotlib, which draws the report's plots


def _pyplot():
    """matplotlib's pyplot on its file-only backend, or None where matplotlib is not installed (the report then
    has its tables and says how to get the plots): the library itself never needs a plotting package."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v, digits: int = 2, sign: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


SCENARIOS = [(f.label, f.key) for f in FIGURES]  # the summary table's rows, in order


def markdown(r: dict) -> str:
    p, s, paper = r["preset"], r["summary"], r["paper"]
    lines = [f"# cnnmod study: preset `{p['name']}`", "",
             f"Data: {r['data']} (reuse classes {r['main_classes']}) and {r['second_data']} (classes "
             f"{r['second_classes']}); models: {p['arch']} ({p['epochs']} epochs"
             + (f", {p['subset']} training images" if p.get("subset") else "") + f"); seed {r['seed']}; "
             f"carbon intensity of {r['country']}."]
    if r.get("unfinished"):
        lines += ["", f"**Unfinished:** {', '.join(r['unfinished'])}. This report shows the parts finished so far; "
                  f"`{r.get('command', 'cnnmod reproduce')} --out DIR` resumes from what is cached."]
    if p["name"] == "quick":
        lines += ["", "**Quick preset:** small models, few epochs, subsets and capped test sets; its numbers show "
                  "that the pipeline works and how the scenarios compare, not the method's best."]
    lines += ["", "## Summary against the paper", ""]
    lines += _table(["figure", "cnnmod", "paper"],
                    [[label, _f(s.get(key), 2, "pp" in label), _f(paper.get(key), 2, "pp" in label)]
                     for label, key in SCENARIOS])
    for d in [d for d in r.get("decomposition", []) if d["variant"] == "mc-bln"][:1]:
        lines += ["", f"Decomposition ({d['model']}, mc-bln): top-1 {d['top1_change_pp']:+.2f} pp with modules that "
                  f"keep {100 * d['jaccard_model_mean']:.1f} % of the model's nodes on average (a module that keeps "
                  "nearly all of them loses little and saves little)."]
    lines += ["", "The study runs the paper's settings. cnnmod's own defaults (what `cnnmod compose` and `replace` "
              "choose without options) where they differ, against the paper's setting:", ""]
    for what, default, ours, theirs in (("inter-data-set reuse", "platt-ood", "inter_reuse_ood_pp", "inter_reuse_pp"),
                                        ("intra-data-set replace (top-1 gain)", "platt",
                                         "intra_replace_top1_calibrated_pp", "intra_replace_top1_pp"),
                                        ("inter-data-set replace", "platt-ood", "inter_replace_top1_ood_pp",
                                         "inter_replace_top1_pp")):
        if s.get(ours) is not None and s.get(theirs) is not None:
            verdict = "the paper's setting loses" if s[ours] > s[theirs] else \
                "the default loses here" if s[ours] < s[theirs] else "a tie"
            lines.append(f"- {what}: cnnmod's default (calibration {default}) {_f(s[ours], 2, True)} pp; the "
                         f"paper's scores as they are {_f(s[theirs], 2, True)} pp: {verdict}")
    lines += ["", "## 1. Decomposition cost", ""]
    lines += _table(["model", "variant", "model top-1/top-5", "composed top-1/top-5", "change (pp)", "Jaccard",
                     "seconds (% of training)"],
                    [[d["model"], d["variant"], f"{d['model_top1']:.2f} / {d['model_top5']:.2f}",
                      f"{d['composed_top1']:.2f} / {d['composed_top5']:.2f}",
                      f"{d['top1_change_pp']:+.2f} / {d['top5_change_pp']:+.2f}",
                      f"{d['jaccard_model_mean']:.3f}",
                      f"{d['decomposition_seconds']:.1f} ({100 * d['decomposition_to_training']:.2f}%)"]
                     for d in r.get("decomposition", [])])
    lines += ["", "## 2. Intra-data-set reuse (2 classes: composed modules MA vs a model trained on them, TMA)", ""]
    lines += ["Refitted (ours, beyond the paper): each module's two-way head refitted on the two classes' "
              "training inputs (`compose --refit-heads`; a linear fit on the features the module computes, no network "
              "weight changes).", ""]
    lines += _table(["classes", "TMA", "MA", "MA - TMA (pp)", "refitted (delta)"],
                    [[" + ".join(x["names"]), _f(x["tma"]), _f(x["ma"]), _f(x["delta_pp"], 2, True),
                      f"{_f(x.get('ma_refit'))} ({_f(x.get('delta_refit_pp'), 2, True)})"]
                     for x in r.get("intra_reuse", [])])
    lines += ["", "## 3. Inter-data-set reuse (MMA: with continuous learning)", "",
              "Accuracy over the union of the two classes' test images; balanced (mean per class) in brackets. "
              "TMA: trained from scratch on the two classes, class-balanced. Calibrated (Platt): MA with each "
              "module's calibration fitted at decomposition on its own data set; MMA with it refitted, during "
              "continuous learning, on the composition's two classes. MA platt-ood (ours): MA's Platt scores times "
              "each module's in-distribution test, fitted at decomposition on its own data set (`--calibration "
              "platt-ood`). MMA refitted (ours, beyond the paper): "
              "continuous learning with each module's two-way head refitted on the two classes' training inputs "
              "(`compose --continuous-learning --refit-heads`).", ""]
    lines += _table(["classes", "TMA", "MA", "MMA", "MA - TMA", "MMA - TMA", "MA / MMA calibrated",
                     "MA platt-ood (delta)", "MMA refitted (delta)", "MMA refitted, calibrated (delta)"],
                    [[" + ".join(x["classes"]), f"{x['tma']:.2f} ({x['tma_balanced']:.1f})",
                      f"{x['ma']:.2f} ({x['ma_balanced']:.1f})", f"{x['mma']:.2f} ({x['mma_balanced']:.1f})",
                      _f(x["delta_pp"], 2, True), _f(x["delta_cl_pp"], 2, True),
                      f"{_f(x.get('ma_calibrated'))} / {_f(x.get('mma_calibrated'))}",
                      f"{_f(x.get('ma_ood'))} ({_f(x.get('delta_ood_pp'), 2, True)})",
                      f"{_f(x.get('mma_refit'))} ({_f(x.get('delta_refit_pp'), 2, True)})",
                      f"{_f(x.get('mma_refit_calibrated'))} ({_f(x.get('delta_refit_calibrated_pp'), 2, True)})"]
                     for x in r.get("inter_reuse", [])])
    lines += ["", "## 4. Intra-data-set replacement (weak model's module replaced by the stronger model's)", ""]
    lines += _table(["class", "prior top-1", "top-1", "prior top-5", "top-5", "gain top-1 (pp)",
                     "calibrated: prior / top-1 / gain", "platt-ood: prior / top-1 / gain"],
                    [[x["name"], _f(x["prior_top1"]), _f(x["top1"]), _f(x["prior_top5"]), _f(x["top5"]),
                      _f(x["gain_top1_pp"], 2, True), f"{_f(x.get('prior_top1_calibrated'))} / "
                      f"{_f(x.get('top1_calibrated'))} / {_f(x.get('gain_top1_calibrated_pp'), 2, True)}",
                      f"{_f(x.get('prior_top1_ood'))} / {_f(x.get('top1_ood'))} / "
                      f"{_f(x.get('gain_top1_ood_pp'), 2, True)}"]
                     for x in r.get("intra_replace", [])])
    lines += ["", "## 5. Inter-data-set replacement (vs a model trained from scratch on the resulting classes)", ""]
    lines += _table(["replaced", "with", "TMA top-1/top-5", "composed top-1/top-5", "delta top-1 (pp)",
                     "calibrated top-1 (delta)", "platt-ood top-1 (delta)", "heads refitted top-1 (delta)"],
                    [[x["replaced"], x["with"], f"{x['tma_top1']:.2f} / {x['tma_top5']:.2f}",
                      f"{x['top1']:.2f} / {x['top5']:.2f}", _f(x["delta_top1_pp"], 2, True),
                      f"{_f(x.get('top1_calibrated'))} ({_f(x.get('delta_top1_calibrated_pp'), 2, True)})",
                      f"{_f(x.get('top1_ood'))} ({_f(x.get('delta_top1_ood_pp'), 2, True)})",
                      f"{_f(x.get('top1_refit'))} ({_f(x.get('delta_top1_refit_pp'), 2, True)})"]
                     for x in r.get("inter_replace", [])])
    energy = r.get("energy", [])
    how = "measured" if energy and all(str(e.get("power")).startswith("measured")
                                       and "estimated" not in str(e.get("power")) for e in energy) else "estimated"
    lines += ["", f"## 6. Energy and CO2e, {how}", ""]
    if energy:
        lines += [f"Tracker: {energy[0]['tracker']}; power: {energy[0]['power']}.", ""]
        lines += ["Per scenario, means of one composition: training a model from scratch (fixed epochs, and up to its "
                  "best epoch) against building the composition (reuse), and the one-time decomposition of the "
                  "modules' source models. The last column takes the scenario as a whole: all the models it trained "
                  "against all its compositions plus that one decomposition, which they share.", ""]
    lines += _table(["scenario", "training (fixed epochs)", "training (to best epoch)", "reuse", "decomposition "
                     "(once)", "training / reuse", "training / (reuse + decomposition)",
                     "all training / (all reuse + decomposition) (models trained / compositions)",
                     "break-even (compositions)"],
                    [[e["scenario"], co2_text(e["training_kg_co2e"]), co2_text(e["training_to_best_kg_co2e"]),
                      co2_text(e["reuse_kg_co2e"]), co2_text(e["decomposition_kg_co2e_once"]),
                      _f(e["ratio_training_to_reuse"], 1), _f(e["ratio_training_to_reuse_with_decomposition"], 1),
                      _f(e.get("ratio_all_training_to_all_reuse_with_decomposition"), 1)
                      + (f" ({e['models_trained']} / {e['compositions']})" if "models_trained" in e else ""),
                      e.get("break_even_compositions") if e.get("break_even_compositions") is not None else "-"]
                     for e in energy])
    lines += ["", "## 7. The dense predecessor (MLPs of 49-unit ReLU layers)", ""]
    lines += _table(["hidden layers", "variant", "model", "composed", "delta (pp)", "Jaccard", "paper model",
                     "paper composed"],
                    [[x["hidden_layers"], x["variant"], _f(x["model_top1"]), _f(x["composed_top1"]),
                      _f(x["delta_pp"], 2, True), _f(x["jaccard"], 3), _f(x["paper_model_top1"]),
                      _f(x["paper_composed_top1"])] for x in r.get("dense", [])])
    if r.get("part_seconds"):
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in r["part_seconds"].items())
        lines += ["", f"Wall-clock time of the parts, as the runs that finished them measured it: "
                  f"{r['seconds_all_runs']:.0f} s in all ({parts})."]
    lines += ["", f"Made by `{r.get('command', 'cnnmod reproduce')}`.", ""]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def charted(summary: dict) -> list[tuple[str, str]]:
    """The scenarios of the accuracy chart: those in percentage points measured so far, in the report's order."""
    return [(label, key) for label, key in SCENARIOS if key.endswith("_pp") and summary.get(key) is not None]


def figures(r: dict) -> dict[str, str]:
    """name -> base64 PNG of each plot (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return {}
    out = {}
    s, paper = r["summary"], r["paper"]
    keys = charted(s)
    if keys:  # the scenarios measured so far, the first at the top; the paper's bar where it has the figure
        fig, ax = plt.subplots(figsize=(8, 0.8 + 0.3 * len(keys)))
        ys = range(len(keys))
        ax.barh([y - 0.2 for y in ys], [s[k] for _, k in keys], height=0.4, label="cnnmod", color="#2b6cb0")
        ax.barh([y + 0.2 for y in ys], [paper.get(k) or 0 for _, k in keys], height=0.4, label="paper",
                color="#bbbbbb")
        ax.set_yticks(list(ys), [label for label, _ in keys], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("percentage points")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("Accuracy per scenario, ours beside the paper's")
        out["accuracy"] = _png(fig)

    energy = r.get("energy", [])
    if energy:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [e["scenario"] for e in energy]
        x = range(len(names))
        for offset, key, label in ((-0.27, "training_kg_co2e", "training from scratch"),
                                   (0.0, "reuse_kg_co2e", "reuse / replace"),
                                   (0.27, "decomposition_kg_co2e_once", "decomposition (once)")):
            ax.bar([i + offset for i in x], [max(e[key] or 0, 1e-12) for e in energy], width=0.27, label=label)
        ax.set_yscale("log")
        ax.set_xticks(list(x), names, rotation=20, fontsize=8, ha="right")
        ax.set_ylabel("kg CO2e (log scale)")
        ax.legend(fontsize=8)
        ax.set_title("Energy per scenario")
        out["energy"] = _png(fig)

    dec = [d for d in r.get("decomposition", []) if d["variant"] == "mc-bln"]
    if dec:
        pc = dec[0]["per_class"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        x = range(len(pc))
        ax.bar([i - 0.2 for i in x], [c["model_top1"] or 0 for c in pc], width=0.4, label="model")
        ax.bar([i + 0.2 for i in x], [c["composed_top1"] or 0 for c in pc], width=0.4, label="composed modules")
        ax.set_xticks(list(x), [c["name"] for c in pc], rotation=30, fontsize=8, ha="right")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("Per-class accuracy, model vs composition (MC-BLN)")
        out["per_class"] = _png(fig)

        fig, ax = plt.subplots(figsize=(8, 3.5))
        variants = [d for d in r.get("decomposition", [])]
        width = 0.8 / max(len(variants), 1)
        for j, d in enumerate(variants):
            ax.bar([i - 0.4 + width * (j + 0.5) for i in x], [100 * c["kept_fraction"] for c in d["per_class"]],
                   width=width, label=d["variant"])
        ax.set_xticks(list(x), [c["name"] for c in pc], rotation=30, fontsize=8, ha="right")
        ax.set_ylabel("kept nodes (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("Module sizes: share of the model's nodes each module keeps")
        out["module_sizes"] = _png(fig)
    return out


def _md_to_html(md: str) -> str:
    """The small markdown subset the report uses: headings, paragraphs, bullet lists, bold, code and tables."""
    parts, table, items = [], [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        out, bold, code = "", False, False
        i = 0
        while i < len(text):
            if text.startswith("**", i) and not code:
                out += "</b>" if bold else "<b>"
                bold = not bold
                i += 2
            elif text[i] == "`":
                out += "</code>" if code else "<code>"
                code = not code
                i += 1
            else:
                out += text[i]
                i += 1
        return out

    def flush() -> None:
        if items:
            parts.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            head, body = table[0], table[2:]
            parts.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("## "):
            parts.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            parts.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(parts)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%;margin:1em 0}code{background:#f4f4f4;padding:0 3px}")


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    md = markdown(results)
    (out / "report.md").write_text(md)
    body = _md_to_html(md)
    plots = figures(results)
    images = "".join(f'<h2>Plot: {name.replace("_", " ")}</h2><img alt="{name}" src="data:image/png;base64,{b64}">'
                     for name, b64 in plots.items())
    if not plots:
        images = f"<p>The plots need matplotlib: <code>{html.escape(PLOTS_EXTRA)}</code>, then run again.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cnnmod study ({results['preset']['name']})"
            f"</title><style>{STYLE}</style></head><body>{body}{images}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.md", out / "report.html"
