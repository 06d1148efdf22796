"""Shared helpers for benchmarks: the machine's description and the ledger (docs/results/benchmarks-history.md)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores {cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def record(name: str, command: str, figures: dict, summary: str) -> Path:
    """Write ``benchmarks/out/NAME.json`` and return its path; print the ledger line to add to the ledger
    (docs/results/benchmarks-history.md)."""
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    payload = {"benchmark": name, "date": stamp, "machine": machine(), "command": command, "figures": figures}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| {stamp} | {name} | `{command}` | {machine()} | {summary} |")
    return path
