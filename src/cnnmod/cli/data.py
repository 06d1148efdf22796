"""``cnnmod data info`` and ``cnnmod data fetch``."""

from __future__ import annotations

import sys

import typer

from .app import DATA_ROOT, JSON, OVERWRITE, data_app, emit


@data_app.command("info")
def data_info(name: str = typer.Argument(...), data_root: str = DATA_ROOT, as_json: bool = JSON) -> None:
    """Classes, sizes, input shape and folder of a data set."""
    from ..data import info

    result = info(name, data_root)
    emit(result, as_json, name)
    if not as_json:
        sys.stdout.write("classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(result["class_names"][:20])) + "\n")


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(...), data_root: str = DATA_ROOT, overwrite: bool = OVERWRITE,
    mirror: str = typer.Option(None, "--mirror", help="Base URL to download from instead of the official one."),
    as_json: bool = JSON,
) -> None:
    """Download a data set from its official address, verify its checksums and unpack it."""
    from ..data import data_root_path
    from ..data.fetch import fetch

    folder = fetch(name, data_root_path(data_root), mirror=mirror, overwrite=overwrite)
    emit({"name": name, "folder": str(folder)}, as_json, f"fetched {name}")
