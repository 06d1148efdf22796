"""How long the command line takes to answer ``--version`` and ``decompose --help``, against Python importing
torch, side by side (each run in turn, the median of the rounds).

    .venv/bin/python benchmarks/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

BIN = Path(sys.executable).parent
COMMANDS = {"version": [str(BIN / "cnnmod"), "--version"], "decompose_help": [str(BIN / "cnnmod"), "decompose",
                                                                             "--help"],
            "import_torch": [sys.executable, "-c", "import torch"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - started)
    median = {k: round(statistics.median(v), 3) for k, v in seconds.items()}
    ratios = {k: round(median[k] / median["import_torch"], 3) for k in ("version", "decompose_help")}
    record("startup", "python benchmarks/startup.py " + " ".join(sys.argv[1:]), {"median_s": median, **ratios},
           f"cnnmod --version {median['version']:.2f} s, decompose --help {median['decompose_help']:.2f} s, "
           f"import torch {median['import_torch']:.2f} s: {ratios['version']:.2f}x and "
           f"{ratios['decompose_help']:.2f}x of it")


if __name__ == "__main__":
    main()
