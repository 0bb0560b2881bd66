"""Train one model of the benchmark with a bundle's own ``train.json`` (same data, transforms, loss, optimiser,
schedule and seed for every model; only ``network_def`` differs), optionally until validation stops improving
(MONAI's :class:`~monai.handlers.EarlyStopHandler` on the bundle's validation key metric), and quantise it with the
bundle's :class:`~monai_qsa.handlers.PostTrainingQuantizationHandler` (which calls ``quantize_ptq``)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["train_and_quantize", "trained_run", "training_record", "validation_score", "EarlyStopping"]

REPORT = "quantization_report.json"
SETTINGS = "benchmark_settings.json"
RECORD = "benchmark_training.json"
_SCORE = "$monai_qsa.benchmark.train.validation_score"


@dataclass(frozen=True)
class EarlyStopping:
    """Stop training when the bundle's validation key metric has not improved for ``patience`` validations.

    Args:
        patience: validations without improvement before training stops.
        val_interval: epochs between validations (overrides the bundle's ``val_interval``).

    Raises:
        ValueError: ``patience`` or ``val_interval`` below 1.
    """

    patience: int
    val_interval: int = 1

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}.")
        if self.val_interval < 1:
            raise ValueError(f"val_interval must be at least 1, got {self.val_interval}.")


def validation_score(engine) -> float:
    """The key metric of a MONAI evaluator's last run (the score :class:`~monai.handlers.EarlyStopHandler` follows)."""
    return float(engine.state.metrics[engine.state.key_metric_name])


def _settings(
    bundle_dir: Path,
    dataset_dir: Path,
    network_def: dict,
    seed: int,
    epochs: int,
    stopping: EarlyStopping | None,
) -> dict:
    return {
        "bundle_dir": str(bundle_dir),
        "dataset_dir": str(dataset_dir),
        "network_def": network_def,
        "seed": seed,
        "epochs": epochs,
        "early_stopping": asdict(stopping) if stopping else None,
    }


def trained_run(
    run_dir: Path,
    bundle_dir: Path,
    dataset_dir: Path,
    network_def: dict,
    seed: int,
    epochs: int,
    stopping: EarlyStopping | None = None,
) -> dict | None:
    """The quantisation report of an earlier training in ``run_dir`` with the same settings whose int8 step
    succeeded, or None (train again)."""
    report, settings = run_dir / "models" / REPORT, run_dir / SETTINGS
    if not ((run_dir / "models" / "model.pt").is_file() and report.is_file() and settings.is_file()):
        return None
    expected = _settings(bundle_dir, dataset_dir, network_def, seed, epochs, stopping)
    if json.loads(settings.read_text()) != expected:
        return None
    finished = json.loads(report.read_text())
    return None if finished.get("error") else finished


def _overrides(run_dir: Path, dataset_dir: Path, network_def: dict, seed: int, epochs: int) -> dict:
    return {
        "ckpt_dir": str(run_dir / "models"),
        "log_dir": str(run_dir / "logs"),
        "dataset_dir": str(dataset_dir),
        "network_def": network_def,
        "num_epochs": epochs,
        "resume": False,
        "initialize": [f"$monai.utils.set_determinism(seed={seed})"],
        "quantization#latency_repeats": 0,  # the benchmark times every model itself
    }


def _adapt_handlers(parser, stopping: EarlyStopping | None) -> None:
    """Drop Ignite's per-iteration progress bar (the benchmark shows its own progress) and, with ``stopping``,
    validate every ``stopping.val_interval`` epochs and stop when the validation key metric stalls."""
    parser["train#handlers"] = [
        h
        for h in parser["train#handlers"]
        if not (isinstance(h, dict) and h.get("_target_", "").endswith("ProgressBar"))
    ]
    if stopping is None:
        return
    parser["val_interval"] = stopping.val_interval
    handlers = parser["validate#handlers"]
    # the trainer is set when the run starts: naming it here would make the evaluator's handlers, which the
    # trainer's ValidationHandler holds, refer back to the trainer
    stop = {"_target_": "EarlyStopHandler", "patience": stopping.patience, "score_function": _SCORE}
    parser["validate#handlers"] = handlers + [stop]
    parser["run"] = [f"$@validate#handlers#{len(handlers)}.set_trainer(@train#trainer)"] + parser["run"]


def training_record(run_dir: Path) -> dict:
    """``{"epochs_run", "seconds"}`` of the training in ``run_dir`` (written by :func:`train_and_quantize`)."""
    return json.loads((run_dir / RECORD).read_text())


def train_and_quantize(
    run_dir: Path,
    bundle_dir: Path,
    dataset_dir: Path,
    network_def: dict,
    seed: int,
    epochs: int,
    stopping: EarlyStopping | None = None,
) -> dict:
    """Train ``network_def`` with the bundle's training recipe, then quantise the best checkpoint.

    Args:
        run_dir: output folder (``models/``: ``model.pt``, ``model_int8.pt2`` or ``model_int8.rejected.pt2``,
            ``quantization_report.json``; ``logs/``; the settings used; epochs run and seconds taken); replaced if
            it exists.
        bundle_dir: bundle whose ``configs/train.json`` is the recipe; passed as ``bundle_root``.
        dataset_dir: Decathlon-style dataset; the built-in synthetic one is written there if it does not exist.
        network_def: bundle-style network config (``_target_`` and arguments).
        seed: seed for ``monai.utils.set_determinism``.
        epochs: training epochs (the most, with ``stopping``).
        stopping: stop early when validation stops improving; None trains all ``epochs``.

    Returns:
        the quantisation report (fp32 and int8 validation metric, parameters, FLOPs, sizes).

    Raises:
        RuntimeError: the run produced no ``model.pt`` or its int8 step failed, naming the log folder.
    """
    from monai.bundle import ConfigWorkflow

    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    dataset_dir = Path(dataset_dir)
    began = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(bundle_dir / "configs" / "train.json"),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_dir),
        **_overrides(run_dir, dataset_dir, network_def, seed, epochs),
    )
    _adapt_handlers(workflow.parser, stopping)
    workflow.initialize()
    workflow.run()
    epochs_run = int(workflow.trainer.state.epoch)
    workflow.finalize()
    settings = _settings(bundle_dir, dataset_dir, network_def, seed, epochs, stopping)
    (run_dir / SETTINGS).write_text(json.dumps(settings, indent=2))
    record = {"epochs_run": epochs_run, "seconds": round(time.perf_counter() - began, 1)}
    (run_dir / RECORD).write_text(json.dumps(record, indent=2))
    report_path = run_dir / "models" / REPORT
    if not (run_dir / "models" / "model.pt").is_file() or not report_path.is_file():
        raise RuntimeError(f"training in {run_dir} left no models/model.pt or {REPORT}; see {run_dir / 'logs'}.")
    report = json.loads(report_path.read_text())
    if report.get("error"):
        raise RuntimeError(f"int8 quantisation of {run_dir / 'models' / 'model.pt'} failed: {report['error']}")
    logging.getLogger(__name__).info(f"trained {network_def['_target_']} in {run_dir} ({epochs_run} epochs)")
    return report
