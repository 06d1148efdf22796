"""The ``cnnmod`` command's application, its shared options, the parsing of option values and the output of a
result; the commands live beside it (:mod:`.models`, :mod:`.modules`, :mod:`.data`).

Every command takes ``--json`` (one JSON object on stdout, nothing else there); human output, progress bars
and logs go to stderr. A mistake the user can fix prints one line and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys

import typer

from ..errors import UserError
from ..progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decompose trained CNN classifiers into reusable, replaceable per-class modules.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and download data sets.")
app.add_typer(data_app, name="data")

# the flag of each library setting whose flag is not ``--`` + its name with dashes (UserError.for_command_line)
FLAGS = {"step": "--slim-step", "step_samples": "--slim-step-samples", "samples": "--slim-samples",
         "cost": "--slim-cost", "budget": "--slim-budget", "multiple": "--slim-multiple", "recipe": "--slim-recipe",
         "cls": "--class", "replacement": "--with"}

JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
SEED = typer.Option(0, "--seed", help="Random seed; the same seed gives the same result.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
DATA_ROOT = typer.Option(None, "--data-root",
                         help="Folder holding the data sets (default: $CNNMOD_DATA or the cache).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace the output folder if it exists.")
COUNTRY = typer.Option(None, "--country", help="Country for the carbon intensity, ISO 3166-1 alpha-3 (default: "
                       "$CNNMOD_COUNTRY or USA).")
ARCH_ARG = typer.Option([], "--arch-arg", help="Architecture option KEY=VALUE: width=32, stem=cifar, hidden=49,49.")


def emit(result: dict, as_json: bool, title: str = "") -> None:
    """One JSON object on stdout, or a readable table on stderr (from torchrun's first process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in result.items():
        if not isinstance(value, (list, dict)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    for key, value in result.items():  # lists of records (per-class accuracy, epochs) as tables of their own
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # nested fields (a slim module's pruning history) do not read in a cell: named under the table
            nested = [c for c in value[0] if any(isinstance(v.get(c), (list, dict)) for v in value)]
            rows = Table(title=key, caption=f"{', '.join(nested)}: with --json" if nested else None)
            columns = [c for c in value[0] if c not in nested]
            for c in columns:
                rows.add_column(c)
            for v in value:
                rows.add_row(*(f"{v.get(c):.4g}" if isinstance(v.get(c), float) else str(v.get(c)) for c in columns))
            console.print(rows)


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
