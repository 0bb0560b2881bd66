"""Ignite handler that measures energy per epoch and per run with CodeCarbon's offline tracker."""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_qsa.utils.csv_rows import append_csv_row, extend_csv_columns
from monai_qsa.utils.energy import DEFAULT_COUNTRY_ISO_CODE, EnergyMeter, EnergyReading

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["EnergyHandler", "CSV_COLUMNS", "PROCESS_RUN_ID"]

#: columns of the energy CSV; new columns are only ever added at the end (older files are extended in place)
CSV_COLUMNS = (
    "timestamp", "phase", "scope", "epoch", "samples", "duration_s", "energy_kwh", "cpu_kwh", "ram_kwh",
    "gpu_kwh", "emissions_kg", "joules_per_sample", "cpu_power_w", "ram_power_w", "method", "run_id",
)  # fmt: skip
#: ``run_id`` of the rows this process writes unless the handler is given one: UTC start time and a random suffix
PROCESS_RUN_ID = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def count_samples(batch) -> int:
    """Number of images/volumes in a batch: the leading size of its ``image`` tensor (MONAI dict batches), or of
    its first tensor (tuples/lists); 0 when none is found."""
    if isinstance(batch, dict):
        candidates = [batch["image"]] if "image" in batch else list(batch.values())
    elif isinstance(batch, (list, tuple)):
        candidates = list(batch)
        if candidates and isinstance(candidates[0], dict):  # a decollated list of per-sample dicts
            return len(candidates)
    else:
        candidates = [batch]
    for item in candidates:
        if isinstance(item, torch.Tensor) and item.ndim > 0:
            return int(item.shape[0])
    return 0


class EnergyHandler:
    """
    Measures the energy of an Ignite engine (a MONAI trainer or evaluator) per epoch and per run with CodeCarbon's
    ``OfflineEmissionsTracker``, which never contacts the network.

    At each ``EPOCH_COMPLETED`` it puts into ``engine.state.metrics`` (so ``StatsHandler``, TensorBoard and MLflow
    handlers attached *after* it log them), with ``prefix`` defaulting to ``"energy_"``:
    ``{prefix}epoch_kwh``, ``{prefix}epoch_j_per_sample``, ``{prefix}epoch_duration_s``, ``{prefix}epoch_emissions_kg``,
    ``{prefix}epoch_cpu_kwh``, ``{prefix}epoch_ram_kwh``, and the running totals ``{prefix}run_kwh``,
    ``{prefix}run_j_per_sample``; ``engine.state.energy`` holds the :class:`EnergyReading` objects.
    Each epoch and, at ``COMPLETED``, the run total are appended as rows to ``output_dir/csv_name`` (one locked
    append per row; an existing file is never truncated), each row naming how it was measured and the run it
    belongs to (``run_id``: the handlers of one process share one id, so rows of several runs appended to one CSV
    can be told apart). A CSV written before the ``run_id`` column existed gets it added to its header (its rows
    are kept, with an empty ``run_id``); a last line cut by a killed run is kept, and new rows start on a new line.

    The readings are taken at the phase boundaries (CodeCarbon's ``start_task``/``stop_task``), so an evaluator
    epoch of a few seconds gets its own, non-zero figure. With CodeCarbon's default ``machine`` tracking mode a
    phase is charged for the whole machine's CPU load during it. Attach it to a trainer *before* the
    ``ValidationHandler`` so a training epoch's figure excludes validation, which the evaluator's handler measures.
    If CodeCarbon is missing or raises, one warning is logged and the engine runs on without energy figures.

    Args:
        output_dir: folder of the CSV; None writes no CSV.
        csv_name: CSV file name.
        phase: label of this engine in the CSV and log, e.g. ``"train"`` or ``"validate"``; defaults to the
            engine's class name.
        prefix: prefix of the metric names.
        country_iso_code: ISO 3166-1 alpha-3 country for the emissions factor (default ``"USA"``).
        measure_power_secs: CodeCarbon's power sampling interval within a phase.
        tracking_mode: ``"machine"`` or ``"process"`` (CodeCarbon's modes).
        run_id: ``run_id`` column of this handler's rows; defaults to :data:`PROCESS_RUN_ID`.

    Raises:
        ValueError: at ``attach``, the CSV exists with columns other than :data:`CSV_COLUMNS` (or a leading part
            of them), naming it; it is left untouched.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        csv_name: str = "energy.csv",
        phase: str | None = None,
        prefix: str = "energy_",
        country_iso_code: str = DEFAULT_COUNTRY_ISO_CODE,
        measure_power_secs: float = 1.0,
        tracking_mode: str = "machine",
        run_id: str | None = None,
    ) -> None:
        self.csv_path = Path(output_dir) / csv_name if output_dir is not None else None
        self.phase = phase
        self.prefix = prefix
        self.run_id = PROCESS_RUN_ID if run_id is None else run_id
        self.meter = EnergyMeter(country_iso_code, measure_power_secs, tracking_mode)
        self.logger = logging.getLogger(__name__)
        self._samples = 0
        self._run_total: EnergyReading | None = None
        self._run_started = 0.0
        self._method_logged = False

    def attach(self, engine: Engine) -> None:
        if self.phase is None:
            self.phase = type(engine).__name__
        if self.csv_path is not None:
            extend_csv_columns(self.csv_path, CSV_COLUMNS)
        for event, handler in (
            (Events.STARTED, self.run_started),
            (Events.EPOCH_STARTED, self.epoch_started),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.EPOCH_COMPLETED, self),
            (Events.COMPLETED, self.run_completed),
        ):
            if not engine.has_event_handler(handler, event):
                engine.add_event_handler(event, handler)

    def run_started(self, engine: Engine) -> None:
        self._run_total = None
        self._run_started = time.perf_counter()

    def epoch_started(self, engine: Engine) -> None:
        self._samples = 0
        self.meter.start()

    def iteration_completed(self, engine: Engine) -> None:
        self._samples += count_samples(engine.state.batch)

    def __call__(self, engine: Engine) -> None:
        """Ends the epoch's measurement and publishes it (``EPOCH_COMPLETED``)."""
        reading = self.meter.stop(samples=self._samples)
        if reading is None:
            return
        if not self._method_logged:
            self.logger.info("%s energy measured with: %s", self.phase, reading.method)
            self._method_logged = True
        self._run_total = reading if self._run_total is None else self._run_total + reading
        p = self.prefix
        engine.state.metrics.update(
            {
                f"{p}epoch_kwh": reading.energy_kwh,
                f"{p}epoch_j_per_sample": reading.joules_per_sample,
                f"{p}epoch_duration_s": reading.duration_s,
                f"{p}epoch_emissions_kg": reading.emissions_kg,
                f"{p}epoch_cpu_kwh": reading.cpu_kwh,
                f"{p}epoch_ram_kwh": reading.ram_kwh,
                f"{p}run_kwh": self._run_total.energy_kwh,
                f"{p}run_j_per_sample": self._run_total.joules_per_sample,
            }
        )
        engine.state.energy = {"epoch": reading, "run": self._run_total}
        self._append_row("epoch", engine.state.epoch, reading)

    def run_completed(self, engine: Engine) -> None:
        """Writes the run total (the sum of the epochs) and logs it (``COMPLETED``)."""
        if self._run_total is None:
            return
        total = self._run_total
        self.logger.info(
            "%s energy: %.6f kWh over %d samples (%.2f J/sample, %.1f s of epochs in a %.1f s run), %.3g kg CO2eq; %s",
            self.phase, total.energy_kwh, total.samples, total.joules_per_sample, total.duration_s,
            time.perf_counter() - self._run_started, total.emissions_kg, total.method,
        )  # fmt: skip
        self._append_row("run", engine.state.epoch, total)

    def _append_row(self, scope: str, epoch: int, reading: EnergyReading) -> None:
        if self.csv_path is None:
            return
        row = {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "phase": self.phase,
            "scope": scope,
            "epoch": epoch,
            "samples": reading.samples,
            "duration_s": f"{reading.duration_s:.3f}",
            "energy_kwh": f"{reading.energy_kwh:.9g}",
            "cpu_kwh": f"{reading.cpu_kwh:.9g}",
            "ram_kwh": f"{reading.ram_kwh:.9g}",
            "gpu_kwh": f"{reading.gpu_kwh:.9g}",
            "emissions_kg": f"{reading.emissions_kg:.9g}",
            "joules_per_sample": f"{reading.joules_per_sample:.6g}",
            "cpu_power_w": f"{reading.cpu_power_w:.3f}",
            "ram_power_w": f"{reading.ram_power_w:.3f}",
            "method": reading.method,
            "run_id": self.run_id,
        }
        append_csv_row(self.csv_path, row, CSV_COLUMNS)
