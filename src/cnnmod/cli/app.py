"""The ``cnnmod`` command's application, its shared options, the parsing of option values and the output of a
result; the commands live beside it (:mod:`.models`, :mod:`.modules`, :mod:`.data`).

Every command prints its result on stdout: readable tables and a summary line, or with ``--json`` one JSON object
(nothing else there); progress bars and notes go to stderr. A mistake the user can fix prints one line and exits
with status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import typer

from ..energy import co2_text
from ..errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decompose trained CNN classifiers into reusable, replaceable per-class modules.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and download data sets.")
app.add_typer(data_app, name="data")

# the flag of each library setting whose flag is not ``--`` + its name with dashes (UserError.for_command_line);
# a recipe's fields without a flag of their own are set with ``--set NAME=VALUE`` (cnnmod.cli.command_line_flags)
FLAGS = {"cls": "--class", "replacement": "--with"}
EVERY_COMMAND = ("Every command also takes --data-root DIR (where data sets live; default $CNNMOD_DATA), "
                 "--country CODE (carbon intensity; default $CNNMOD_COUNTRY or USA), --trust-code (load a model "
                 "whose architecture is your own code) and --skip-bad-images (leave unreadable images out).")

JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
SEED = typer.Option(0, "--seed", metavar="N", help="Random seed; the same seed gives the same result.")
DEVICE = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where to run.")
DATA_ROOT = typer.Option(None, "--data-root", metavar="DIR", hidden=True,
                         help="Folder holding the data sets (default: $CNNMOD_DATA or the cache).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace the output folder if it exists.")
COUNTRY = typer.Option(None, "--country", metavar="CODE", hidden=True,
                       help="Country for the carbon intensity, ISO 3166-1 alpha-3 (default: $CNNMOD_COUNTRY or USA).")
BATCH_SIZE = typer.Option(256, "--batch-size", metavar="N", help="Images per batch.")
SET = typer.Option([], "--set", metavar="KEY=VALUE", help="Any setting of the recipe, repeatable "
                   "(docs/commands.md lists them), e.g. --set step=0.3.")
ARCH_ARG = typer.Option([], "--arch-arg", metavar="KEY=VALUE",
                        help="Architecture option: width=32, stem=cifar, hidden=49,49.")


def parse_set(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as {key: text} (each value parsed by the setting it names)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not KEY=VALUE (e.g. --set step=0.3)")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


STARTED = {"at": time.perf_counter()}  # when the command started (set again by each call of cnnmod.cli.main)


LAST_COLUMNS = ("path", "kept_fraction")  # shown only where the terminal has room after the figures


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fitting_columns(records: list[dict], columns: list[str], width: int) -> list[str]:
    """The first of ``columns`` that fit a table ``width`` characters wide, each column as wide as its widest cell
    or its header (rich adds three characters a column and one for the border); at least the first."""
    shown, used = [], 1
    for c in columns:
        need = max([len(c)] + [len(_cell(r.get(c))) for r in records]) + 3
        if shown and used + need > width:
            break
        shown.append(c)
        used += need
    return shown


def emit(result: dict, as_json: bool, title: str = "") -> None:
    """The result on stdout (from torchrun's first process only): one JSON object, or readable tables that fit the
    terminal (80 columns where stdout is not one) and a summary line. A result's ``seconds`` become the command's
    own wall clock, from the start of the command (loading torch and the model included), its parts left beside
    it. Progress and notes stay on stderr."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if isinstance(result.get("seconds"), (int, float)):
        result = {**result, "seconds": round(time.perf_counter() - STARTED["at"], 3)}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    table = Table(title=title, show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long path folds onto the next line rather than being cut
    for key, value in result.items():
        if value is not None and not isinstance(value, (list, dict)):
            table.add_row(key, _cell(value))
    out.print(table)
    for key, value in result.items():  # lists of records (per-class accuracy, epochs) as tables of their own
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            plain = [c for c in value[0] if not any(isinstance(v.get(c), (list, dict)) for v in value)]
            plain.sort(key=lambda c: c in LAST_COLUMNS)  # figures before the paths, which the card lists too
            columns = fitting_columns(value, plain, out.width)
            rest = [c for c in value[0] if c not in columns]
            rows = Table(title=key, caption=f"also {', '.join(rest)}: with --json" if rest else None)
            for c in columns:
                rows.add_column(c, no_wrap=True)
            for v in value:
                rows.add_row(*(_cell(v.get(c)) for c in columns))
            out.print(rows)
    line = summary(result)
    if line:
        out.print(f"[bold]summary[/bold]  {line}")


def summary(result: dict) -> str:
    """What a command's result comes to, in one line: accuracy against the model, the work's CO2e (measured or
    estimated), the inference cost against the model, and the command's seconds."""
    parts = []
    if "composed_top1" in result and "model_top1" in result:
        parts.append(f"top-1 {result['composed_top1']:.2f} % (model {result['model_top1']:.2f}, "
                     f"{result['composed_top1'] - result['model_top1']:+.2f} pp)")
    elif "composed_top1" in result:
        parts.append(f"top-1 {result['composed_top1']:.2f} %")
    elif result.get("held_out_top1") is not None and result.get("held_out_model_top1") is not None:
        parts.append(f"held-out top-1 {result['held_out_top1']:.2f} % (model {result['held_out_model_top1']:.2f})")
    elif "test_top1" in result:
        parts.append(f"test top-1 {result['test_top1']:.2f} %")
    listed = result.get("modules") if isinstance(result.get("modules"), list) else []  # evaluate: a count
    modules = [m for m in listed if isinstance(m, dict) and m.get("balanced_accuracy") is not None]
    if modules:
        own = sum(m["balanced_accuracy"] for m in modules) / len(modules)
        model = [m["model_balanced_accuracy"] for m in modules if m.get("model_balanced_accuracy") is not None]
        parts.append(f"modules alone: balanced accuracy {own:.2f} %"
                     + (f" (the model one-vs-rest {sum(model) / len(model):.2f})" if model else ""))
    fractions = [m["params_fraction"] for m in listed if isinstance(m, dict)
                 and m.get("params_fraction") is not None]
    if fractions:
        parts.append(f"{100 * sum(fractions) / len(fractions):.1f} % of the model's parameters on average")
    cost = (result.get("cost") or {}).get("composition")
    if cost:
        parts.append("against the model: " + ", ".join(
            f"{name} {cost[key]:.2f}x" for name, key in (("parameters", "params_fraction"),
                                                       ("FLOPs", "flops_fraction"),
                                                       ("latency", "latency_fraction")) if cost.get(key) is not None))
    elif result.get("params_fraction") is not None:
        parts.append(f"{100 * result['params_fraction']:.1f} % of the model's parameters")
    energy = [e for e in (result.get("energy") or {}).values() if isinstance(e, dict) and "kg_co2e" in e]
    if energy:
        kg = sum(e["kg_co2e"] for e in energy)
        how = "measured" if all(e.get("measured") for e in energy) else "estimated"
        parts.append(f"{co2_text(kg)} CO2e ({how})")
    if isinstance(result.get("seconds"), (int, float)):
        parts.append(f"{result['seconds']:.1f} s")
    return "; ".join(parts)


def class_list(text: str | None, data: str, data_root: str | None) -> list[int] | None:
    """``--classes`` of a data set: indices, or names of its classes (read from the data set only then)."""
    from ..data import parse_class_list

    if text is None or all(p.strip().lstrip("-").isdigit() for p in text.split(",")) or "+" in data:
        return parse_class_list(text)
    from ..data import load

    return parse_class_list(text, load(data, "train", data_root).class_names)


def parse_size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--input-size {text!r} is not HEIGHTxWIDTH (e.g. 28x28)")
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--input-size {text!r} is not HEIGHTxWIDTH (e.g. 28x28)")
    return size


def parse_arch_args(items: list[str], bn: bool | None) -> dict:
    args: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--arch-arg {item!r} is not KEY=VALUE (e.g. width=32)")
        value: object
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif "," in raw:
            try:
                value = [int(v) for v in raw.split(",") if v]
            except ValueError:
                raise UserError(f"--arch-arg {item!r}: a list must be integers separated by commas")
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        if key == "hidden" and isinstance(value, int):
            value = [value]
        args[key] = value
    if bn is not None:
        args["bn"] = bn
    return args


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not numbers separated by commas (e.g. 0.485,0.456,0.406)")
