"""What every job shares: where and how it runs, and the energy meter it reports through."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..energy import EnergyMeter
from ..errors import UserError


@dataclass(frozen=True)
class Run:
    """Where and how a job runs: the device (auto, cpu, cuda, cuda:N), the folder holding the data sets, the
    batch size, whether its output folder may be replaced, and the country whose carbon intensity its energy
    is reported with (default: $CNNMOD_COUNTRY or USA)."""

    device: str = "auto"
    data_root: str | None = None
    batch_size: int = 256
    overwrite: bool = False
    country: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"«batch_size» must be at least 1, got {self.batch_size}")

    def meter(self) -> EnergyMeter:
        return EnergyMeter(self.country)


def seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
