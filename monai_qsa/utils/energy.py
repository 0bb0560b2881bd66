"""Energy measurement with CodeCarbon's offline tracker, for any block of code.

Only :class:`codecarbon.OfflineEmissionsTracker` is used: the online tracker contacts cloud-metadata and
geo-location services. Every reading says how it was obtained (RAPL counters or CodeCarbon's CPU-load
estimate, and RAM's power model), because on machines without RAPL the figures are estimates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

__all__ = ["EnergyReading", "EnergyMeter", "measure_energy", "DEFAULT_COUNTRY_ISO_CODE"]

logger = logging.getLogger(__name__)

#: country whose carbon intensity converts kWh to CO2eq unless the caller names another (ISO 3166-1 alpha-3)
DEFAULT_COUNTRY_ISO_CODE = "USA"
_KWH_TO_J = 3.6e6


@dataclass
class EnergyReading:
    """Energy of one measured phase.

    Attributes:
        duration_s: wall time of the phase.
        energy_kwh: total energy (CPU + RAM + GPU).
        cpu_kwh, ram_kwh, gpu_kwh: the split CodeCarbon gives.
        emissions_kg: CO2-equivalent emissions for the configured country.
        cpu_power_w, ram_power_w: mean power over the phase.
        method: how the figures were obtained, e.g. ``"CPU: CodeCarbon CPU-load x TDP estimate (...)"``.
        samples: images/volumes processed in the phase, when known (0 otherwise).
    """

    duration_s: float
    energy_kwh: float
    cpu_kwh: float
    ram_kwh: float
    gpu_kwh: float
    emissions_kg: float
    cpu_power_w: float
    ram_power_w: float
    method: str
    samples: int = 0

    @property
    def joules(self) -> float:
        return self.energy_kwh * _KWH_TO_J

    @property
    def joules_per_sample(self) -> float:
        """Energy per processed image/volume in joules; NaN when no samples were counted."""
        return self.joules / self.samples if self.samples else math.nan

    def as_dict(self) -> dict:
        return asdict(self) | {"joules": self.joules, "joules_per_sample": self.joules_per_sample}

    def __add__(self, other: EnergyReading) -> EnergyReading:
        """Sum of two consecutive phases (mean powers weighted by duration)."""
        duration = self.duration_s + other.duration_s

        def mean_power(a: float, b: float) -> float:
            return (a * self.duration_s + b * other.duration_s) / duration if duration else 0.0

        return EnergyReading(
            duration_s=duration,
            energy_kwh=self.energy_kwh + other.energy_kwh,
            cpu_kwh=self.cpu_kwh + other.cpu_kwh,
            ram_kwh=self.ram_kwh + other.ram_kwh,
            gpu_kwh=self.gpu_kwh + other.gpu_kwh,
            emissions_kg=self.emissions_kg + other.emissions_kg,
            cpu_power_w=mean_power(self.cpu_power_w, other.cpu_power_w),
            ram_power_w=mean_power(self.ram_power_w, other.ram_power_w),
            method=self.method,
            samples=self.samples + other.samples,
        )


#: CodeCarbon CPU modes that read the hardware's own energy or power counters
_MEASURED_CPU_MODES = {
    "intel_rapl": "RAPL energy counters",
    "windows_emi": "Windows EMI energy counters",
    "intel_power_gadget": "Intel Power Gadget power readings",
    "apple_powermetrics": "Apple powermetrics power readings",
}


def _describe_cpu(cpu) -> str:
    mode = str(getattr(cpu, "_mode", "unknown"))
    if mode in _MEASURED_CPU_MODES:
        return f"CPU: {_MEASURED_CPU_MODES[mode]}"
    tdp = getattr(cpu, "_tdp", None)
    generic = " (generic TDP, CPU model not in CodeCarbon's table)" if getattr(cpu, "_is_generic_tdp", False) else ""
    if mode == "constant":
        return f"CPU: CodeCarbon constant estimate (half of TDP {tdp} W){generic}"
    return f"CPU: CodeCarbon {mode} estimate (load x TDP {tdp} W){generic}"


def describe_measurement(tracker) -> str:
    """How ``tracker`` obtains its figures, from the hardware CodeCarbon detected, e.g.
    ``"CPU: RAPL energy counters; RAM: CodeCarbon power model from installed memory size"``."""
    parts = []
    for hardware in tracker._hardware:
        kind = type(hardware).__name__
        if kind == "CPU":
            parts.append(_describe_cpu(hardware))
        elif kind == "RAM":
            parts.append("RAM: CodeCarbon power model from installed memory size")
        elif kind == "GPU":
            parts.append("GPU: NVML energy counters")
        else:
            parts.append(f"{kind}: CodeCarbon default")
    return "; ".join(parts)


class EnergyMeter:
    """Measures consecutive phases with one CodeCarbon ``OfflineEmissionsTracker``.

    The tracker reads its hardware at both ends of each phase (``start_task``/``stop_task``), so short phases of
    a few seconds give sensible, non-zero figures rather than waiting for CodeCarbon's periodic sampler. If
    CodeCarbon is missing or fails, one warning is logged and ``stop`` returns None from then on.

    Args:
        country_iso_code: country whose grid carbon intensity converts energy to emissions.
        measure_power_secs: CodeCarbon's sampling interval for power during a phase.
        tracking_mode: ``"machine"`` (whole machine, CodeCarbon's default) or ``"process"``.
    """

    def __init__(
        self,
        country_iso_code: str = DEFAULT_COUNTRY_ISO_CODE,
        measure_power_secs: float = 1.0,
        tracking_mode: str = "machine",
    ) -> None:
        self.country_iso_code = country_iso_code
        self.measure_power_secs = measure_power_secs
        self.tracking_mode = tracking_mode
        self._tracker = None
        self._failed = False
        self._running = False
        self.method = "unavailable"

    def _fail(self, action: str, error: BaseException) -> None:
        if not self._failed:
            logger.warning(
                "energy measurement disabled: CodeCarbon failed to %s (%s: %s)", action, type(error).__name__, error
            )
        self._failed = True

    def _ensure_tracker(self):
        if self._tracker is None:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code,
                measure_power_secs=self.measure_power_secs,
                tracking_mode=self.tracking_mode,
                output_methods=[],
                log_level="error",
                allow_multiple_runs=True,
            )
        return self._tracker

    def start(self) -> None:
        """Begin a phase."""
        if self._failed:
            return
        try:
            tracker = self._ensure_tracker()
            tracker.start_task()  # detects the hardware on first use
            self.method = describe_measurement(tracker)
            self._running = True
        except Exception as error:  # codecarbon missing or broken must never stop the caller's work
            self._fail("start", error)

    def stop(self, samples: int = 0) -> EnergyReading | None:
        """End the phase begun by ``start`` and return its reading (None if measurement is unavailable).

        Args:
            samples: images/volumes processed during the phase, for per-sample energy.
        """
        if self._failed or not self._running:
            return None
        self._running = False
        try:
            data = self._tracker.stop_task()
        except Exception as error:
            self._fail("stop", error)
            return None
        if data is None:
            self._fail("stop", RuntimeError("stop_task returned no data"))
            return None
        return EnergyReading(
            duration_s=float(data.duration),
            energy_kwh=float(data.energy_consumed),
            cpu_kwh=float(data.cpu_energy),
            ram_kwh=float(data.ram_energy),
            gpu_kwh=float(data.gpu_energy),
            emissions_kg=float(data.emissions),
            cpu_power_w=float(data.cpu_power),
            ram_power_w=float(data.ram_power),
            method=self.method,
            samples=int(samples),
        )

    def close(self) -> None:
        """End any phase still running and stop the CodeCarbon tracker (its public ``stop``), so that no sampling
        thread outlives the meter. Safe to call more than once; a later ``start`` uses a fresh tracker."""
        tracker, self._tracker, self._running = self._tracker, None, False
        if tracker is None:
            return
        # taken before stop(), which drops the tracker's references to them
        schedulers = [getattr(tracker, name, None) for name in ("_scheduler", "_scheduler_monitor_power")]
        try:
            tracker.stop()  # also ends a task still under measure
        except Exception as error:  # closing must never stop the caller's work or hide its error
            logger.debug("CodeCarbon tracker did not stop cleanly (%s: %s)", type(error).__name__, error)
        for scheduler in schedulers:
            _stop_for_good(scheduler)

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _stop_for_good(scheduler, seconds: float = 10.0) -> None:
    """Stop a CodeCarbon ``PeriodicScheduler`` so that its timer stays stopped. Its sampling callback re-arms the
    next timer before it samples, whether or not ``stop`` has been called meanwhile (codecarbon 3.x,
    ``external/scheduler.py``), so a ``stop`` that lands while a sample is being taken leaves a sampling thread that
    outlives the tracker. Stop again until the current timer has ended (at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        timer = getattr(scheduler, "_timer", None)
        if timer is None or not timer.is_alive():
            return
        scheduler.stop()  # cancels a re-armed timer; a no-op while its callback is still running
        timer.join(timeout=max(deadline - time.monotonic(), 0))


@dataclass
class EnergyMeasurement:
    """Filled in when the ``measure_energy`` block ends; ``reading`` stays None if measurement failed."""

    samples: int = 0
    reading: EnergyReading | None = None


@contextmanager
def measure_energy(
    samples: int = 0,
    country_iso_code: str = DEFAULT_COUNTRY_ISO_CODE,
    measure_power_secs: float = 1.0,
    meter: EnergyMeter | None = None,
) -> Iterator[EnergyMeasurement]:
    """Measure the energy of a block of code.

    Args:
        samples: images/volumes the block processes (may also be set on the yielded object inside the block).
        country_iso_code: country for the emissions factor.
        measure_power_secs: CodeCarbon's sampling interval.
        meter: reuse an :class:`EnergyMeter` (avoids re-detecting the hardware for every block).

    Example::

        with measure_energy(samples=len(batch)) as energy:
            model(batch)
        print(energy.reading.joules_per_sample, energy.reading.method)
    """
    meter = meter or EnergyMeter(country_iso_code, measure_power_secs)
    result = EnergyMeasurement(samples=samples)
    meter.start()
    try:
        yield result
    finally:
        result.reading = meter.stop(samples=result.samples)
