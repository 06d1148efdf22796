"""Energy and CO2e of each phase (training, decomposition, composition, evaluation), behind one small interface.

    meter = EnergyMeter(country="FRA")            # or $CNNMOD_COUNTRY; ISO 3166-1 alpha-3
    with meter.phase("decomposition") as m:
        ...
    m.record.kwh, m.record.kg_co2e, m.record.power   # how the power was known: measured (RAPL, GPU) or estimated

Two trackers: codecarbon's offline tracker (the default; no network: the country's carbon intensity comes
from its bundled energy-mix table) and a plain estimator, constant power x time, for tests and for machines
where codecarbon is absent (``backend="estimator"`` or ``$CNNMOD_ENERGY=estimator``). Every record says
which tracker measured it and whether its power was measured or estimated.

The paper's formula (PUE 1.58, 0.954 lbs CO2e per kWh) is given beside every measured figure, never
instead of it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError

PAPER_PUE = 1.58
PAPER_KG_PER_KWH = 0.954 * 0.45359237
DEFAULT_COUNTRY = "USA"
DEFAULT_WATTS_PER_CORE = 10.0

# Used only where codecarbon is not installed (g CO2e per kWh, codecarbon 3.3's table, 2023 figures).
_FALLBACK_INTENSITY = {"USA": 369.473, "FRA": 56.039, "DEU": 380.95, "GBR": 237.589, "CHN": 582.317,
                       "IND": 713.441, "CAN": 170.043, "SWE": 40.695, "JPN": 485.392, "AUS": 548.692, "BRA": 98.348}


@lru_cache(maxsize=1)
def carbon_intensities() -> dict[str, float]:
    """g CO2e per kWh by ISO 3166-1 alpha-3 country code."""
    try:
        from codecarbon.input import DataSource
    except ImportError:
        return dict(_FALLBACK_INTENSITY)
    table = DataSource().get_global_energy_mix_data()
    return {code: float(row["carbon_intensity"]) for code, row in table.items() if "carbon_intensity" in row}


def check_country(code: str | None) -> str:
    code = (code or os.environ.get("CNNMOD_COUNTRY") or DEFAULT_COUNTRY).strip().upper()
    table = carbon_intensities()
    if code not in table:
        raise UserError(f"unknown country code {code!r} for the carbon intensity; give an ISO 3166-1 alpha-3 code "
                        "such as USA, FRA, DEU or GBR (--country or $CNNMOD_COUNTRY)")
    return code


@dataclass
class EnergyRecord:
    phase: str
    seconds: float
    kwh: float
    kg_co2e: float
    country: str
    carbon_intensity_g_per_kwh: float
    tracker: str          # "codecarbon" or "estimator"
    power: str            # how power was known, e.g. "measured: RAPL", "estimated: CPU load x TDP"
    measured: bool        # True only where power came from hardware counters
    paper_formula_kg_co2e: float

    def to_dict(self) -> dict:
        return asdict(self)

    def prorated(self, fraction: float, phase: str) -> EnergyRecord:
        """A share of this record (e.g. training up to its best epoch), by time."""
        return EnergyRecord(phase, self.seconds * fraction, self.kwh * fraction, self.kg_co2e * fraction,
                            self.country, self.carbon_intensity_g_per_kwh, self.tracker,
                            f"{self.power}; prorated by time", self.measured, self.paper_formula_kg_co2e * fraction)


class Measurement:
    """What ``EnergyMeter.phase`` yields; ``record`` is set when the phase ends."""

    def __init__(self) -> None:
        self.record: EnergyRecord | None = None


RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")  # the CPU's energy counter codecarbon reads on Linux


def rapl_readable() -> bool:
    """Whether this process can read the CPU's RAPL energy counter (then codecarbon measures the CPU)."""
    try:
        int(RAPL.read_text())
        return True
    except (OSError, ValueError):
        return False


def _power_source(cpu: str, gpu: str | None, rapl: bool) -> tuple[str, bool]:
    """How the power of the tracked hardware was known (from codecarbon's emissions data: the CPU and GPU models;
    and whether the RAPL counter is readable), and whether it was measured."""
    if rapl:
        return f"measured: CPU {cpu} (RAPL)" + (f", GPU {gpu} (NVML)" if gpu else ""), True
    if gpu:
        return f"measured GPU counters ({gpu}), estimated CPU {cpu} (CPU load x its rated power)", False
    return f"estimated: CPU {cpu} (codecarbon: CPU load x the processor's rated power, RAM by size)", False


class EnergyMeter:
    """Measures phases one after another (phases do not nest)."""

    def __init__(self, country: str | None = None, backend: str | None = None, watts: float | None = None) -> None:
        self.country = check_country(country)
        self.intensity = carbon_intensities()[self.country]
        backend = (backend or os.environ.get("CNNMOD_ENERGY") or "auto").lower()
        if backend not in ("auto", "codecarbon", "estimator"):
            raise UserError(f"unknown energy backend {backend!r}; use auto, codecarbon or estimator")
        if backend in ("auto", "codecarbon"):
            try:
                import codecarbon  # noqa: F401
            except ImportError:
                if backend == "codecarbon":
                    raise UserError("codecarbon is not installed; pip install codecarbon, or use the estimator")
                backend = "estimator"
            else:
                backend = "codecarbon"
        self.backend = backend
        env_watts = os.environ.get("CNNMOD_WATTS")
        self.watts = float(watts if watts is not None else env_watts if env_watts else
                           DEFAULT_WATTS_PER_CORE * (os.cpu_count() or 1))
        self.records: list[EnergyRecord] = []

    def _record(self, phase: str, seconds: float, kwh: float, power: str, measured: bool) -> EnergyRecord:
        kg = kwh * self.intensity / 1000.0
        rec = EnergyRecord(phase, seconds, kwh, kg, self.country, self.intensity, self.backend, power,
                           measured, kwh * PAPER_PUE * PAPER_KG_PER_KWH)
        self.records.append(rec)
        return rec

    @contextmanager
    def phase(self, name: str) -> Iterator[Measurement]:
        m = Measurement()
        if self.backend == "estimator":
            t0 = time.perf_counter()
            try:
                yield m
            finally:
                seconds = time.perf_counter() - t0
                m.record = self._record(name, seconds, self.watts * seconds / 3.6e6,
                                        f"estimated: constant {self.watts:g} W x time", False)
            return
        tracker = self._codecarbon_tracker()
        t0 = time.perf_counter()
        tracker.start()
        try:
            yield m
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracker.stop()
            seconds = time.perf_counter() - t0
            data = tracker.final_emissions_data
            power, measured = _power_source(data.cpu_model or "?", data.gpu_model or None, rapl_readable())
            m.record = self._record(name, seconds, float(data.energy_consumed), power, measured)

    def _codecarbon_tracker(self):
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return OfflineEmissionsTracker(country_iso_code=self.country, save_to_file=False, log_level="error",
                                           measure_power_secs=1, tracking_mode="process", allow_multiple_runs=True)


def training_energy(record: EnergyRecord, history: list[dict], best_epoch: int, resumed_after: int = 0) -> dict:
    """A training run's energy, and its share up to the best epoch (prorated by the epochs' seconds). A run
    resumed after epoch ``resumed_after`` was measured for its later epochs only: the earlier ones are counted at
    the power measured for those (by their seconds)."""
    total = sum(h.get("seconds", 0.0) for h in history)
    if resumed_after:
        measured = sum(h.get("seconds", 0.0) for h in history if h["epoch"] > resumed_after)
        record = record.prorated(total / measured if measured else 1.0, record.phase)
    upto = sum(h.get("seconds", 0.0) for h in history if h["epoch"] <= best_epoch)
    best = record.prorated(upto / total if total else 1.0, "training up to the best epoch")
    return {"training": record.to_dict(), "training_to_best_epoch": best.to_dict()}


def co2_text(kg: float | None) -> str:
    """A mass of CO2e in the unit that reads best: ``1.2 kg``, ``3.4 g``, ``2.8 mg``."""
    if kg is None:
        return "-"
    for unit, scale in (("kg", 1.0), ("g", 1e3)):
        if abs(kg) * scale >= 1:
            return f"{kg * scale:.3g} {unit}"
    return f"{kg * 1e6:.3g} mg"


def ratio(a: EnergyRecord | dict, b: EnergyRecord | dict, key: str = "kg_co2e") -> float | None:
    """a / b of one quantity (how many times more a phase cost), None where b is zero."""
    av = a[key] if isinstance(a, dict) else getattr(a, key)
    bv = b[key] if isinstance(b, dict) else getattr(b, key)
    return av / bv if bv else None
