"""Train one model of the benchmark with a bundle's own ``train.json`` (same data, transforms, loss, optimiser,
schedule and seed for every model; only ``network_def`` differs) and quantise it with the bundle's
:class:`~monai_qsa.handlers.PostTrainingQuantizationHandler` (which calls ``quantize_ptq``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

__all__ = ["train_and_quantize", "trained_run"]

REPORT = "quantization_report.json"
SETTINGS = "benchmark_settings.json"


def _settings(
    bundle_dir: Path, dataset_dir: Path, network_def: dict, seed: int, epochs: int, compile_int8: bool
) -> dict:
    return {
        "bundle_dir": str(bundle_dir),
        "dataset_dir": str(dataset_dir),
        "network_def": network_def,
        "seed": seed,
        "epochs": epochs,
        "compile_int8": compile_int8,
    }


def trained_run(
    run_dir: Path,
    bundle_dir: Path,
    dataset_dir: Path,
    network_def: dict,
    seed: int,
    epochs: int,
    compile_int8: bool = True,
) -> dict | None:
    """The quantisation report of an earlier training in ``run_dir`` with the same settings whose int8 step
    succeeded, or None (train again)."""
    report, settings = run_dir / "models" / REPORT, run_dir / SETTINGS
    if not ((run_dir / "models" / "model.pt").is_file() and report.is_file() and settings.is_file()):
        return None
    if json.loads(settings.read_text()) != _settings(bundle_dir, dataset_dir, network_def, seed, epochs, compile_int8):
        return None
    finished = json.loads(report.read_text())
    return None if finished.get("error") else finished


def _overrides(
    bundle_dir: Path, run_dir: Path, dataset_dir: Path, network_def: dict, seed: int, epochs: int, compile_int8: bool
) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "train.json"))
    # the benchmark shows its own progress; Ignite's per-iteration bar would interleave with it
    handlers = [
        h
        for h in parser["train"]["handlers"]
        if not (isinstance(h, dict) and h.get("_target_", "").endswith("ProgressBar"))
    ]
    return {
        "bundle_root": str(bundle_dir),
        "ckpt_dir": str(run_dir / "models"),
        "log_dir": str(run_dir / "logs"),
        "dataset_dir": str(dataset_dir),
        "network_def": network_def,
        "num_epochs": epochs,
        "resume": False,
        "initialize": [f"$monai.utils.set_determinism(seed={seed})"],
        "train#handlers": handlers,
        "quantization#compile": compile_int8,
        "quantization#latency_repeats": 0,  # the benchmark times every model itself
    }


def train_and_quantize(
    run_dir: Path,
    bundle_dir: Path,
    dataset_dir: Path,
    network_def: dict,
    seed: int,
    epochs: int,
    compile_int8: bool = True,
) -> dict:
    """Train ``network_def`` with the bundle's training recipe, then quantise the best checkpoint.

    Args:
        run_dir: output folder (``models/``: ``model.pt``, ``model_int8.pt2`` or ``model_int8.rejected.pt2``,
            ``quantization_report.json``; ``logs/``; the settings used); replaced if it exists.
        bundle_dir: bundle whose ``configs/train.json`` is the recipe.
        dataset_dir: Decathlon-style dataset; the built-in synthetic one is written there if it does not exist.
        network_def: bundle-style network config (``_target_`` and arguments).
        seed: seed for ``monai.utils.set_determinism``.
        epochs: training epochs.
        compile_int8: evaluate the int8 model compiled (the deployed path) rather than eagerly.

    Returns:
        the quantisation report (fp32 and int8 validation metric, parameters, FLOPs, sizes).

    Raises:
        RuntimeError: the run produced no ``model.pt`` or its int8 step failed, naming the log folder.
    """
    from monai.bundle import ConfigWorkflow

    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    arguments = (bundle_dir, Path(dataset_dir), network_def, seed, epochs, compile_int8)
    workflow = ConfigWorkflow(
        config_file=str(bundle_dir / "configs" / "train.json"),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **_overrides(bundle_dir, run_dir, Path(dataset_dir), network_def, seed, epochs, compile_int8),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    (run_dir / SETTINGS).write_text(json.dumps(_settings(*arguments), indent=2))
    report_path = run_dir / "models" / REPORT
    if not (run_dir / "models" / "model.pt").is_file() or not report_path.is_file():
        raise RuntimeError(f"training in {run_dir} left no models/model.pt or {REPORT}; see {run_dir / 'logs'}.")
    report = json.loads(report_path.read_text())
    if report.get("error"):
        raise RuntimeError(f"int8 quantisation of {run_dir / 'models' / 'model.pt'} failed: {report['error']}")
    logging.getLogger(__name__).info(f"trained {network_def['_target_']} in {run_dir}")
    return report
