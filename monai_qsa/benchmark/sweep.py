"""``python -m monai_qsa benchmark --sweep``: several sizes of SAUNet and of the MONAI CNNs, each trained with the
task bundle's recipe until validation stops improving, quantised, and timed in every run mode, so that accuracy can
be set against cost (the fronts) and each CNN against the cheapest SAUNet of at least its accuracy (the
matched-accuracy table, whose pairs are timed once more against each other, in turn, in one process). See
``docs/benchmarks.md``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from monai_qsa.benchmark.endtoend import time_end_to_end
from monai_qsa.benchmark.measure import load_network
from monai_qsa.benchmark.report import machine_info
from monai_qsa.benchmark.run import int8_path, measure_in_process
from monai_qsa.benchmark.sweep_report import (
    PAIRED_ROLES,
    chosen_models,
    fastest,
    matched_accuracy_table,
    matched_pairs,
    pair_name,
    pareto_fronts,
    write_sweep_report,
)
from monai_qsa.benchmark.tasks import BENCHMARK_TASKS, default_bundle_dir, sa_network_def
from monai_qsa.benchmark.train import EarlyStopping, train_and_quantize, trained_run, training_record

__all__ = ["SweepModel", "default_sweep_models", "run_sweep", "SWEEP_TASKS", "TIMING_MODES", "CNN_WIDTHS"]

#: tasks with a sweep (segmentation: SAUNet against MONAI's UNet and BasicUNet)
SWEEP_TASKS = ("seg2d", "seg3d")
#: each model's run modes: (precision, compiled); with ``compile=False`` only the eager ones
TIMING_MODES = {"fp32_eager": ("fp32", False), "fp32_compiled": ("fp32", True), "int8_compiled": ("int8", True)}
_EAGER_MODES = {"fp32_eager": ("fp32", False), "int8_eager": ("int8", False)}
#: rounds of the paired timing of each matched pair (:func:`~monai_qsa.benchmark.measure.measure_alternating`)
PAIRED_ROUNDS = 5
#: first-level widths of the CNNs (UNet channels ``w, 2w, 4w, 8w``; BasicUNet features ``w, w, 2w, 4w, 8w, w``)
CNN_WIDTHS = (8, 16, 32)


@dataclass(frozen=True)
class SweepModel:
    """One model of the sweep.

    Args:
        name: unique, file-name safe (``SAUNet-small``, ``UNet-16``); names the run folder.
        family: ``SA`` or ``CNN``.
        network_def: bundle-style network config (``_target_`` and arguments).

    Raises:
        ValueError: ``family`` is neither ``SA`` nor ``CNN``, or ``name`` is not file-name safe.
    """

    name: str
    family: str
    network_def: dict

    def __post_init__(self) -> None:
        if self.family not in ("SA", "CNN"):
            raise ValueError(f"family must be 'SA' or 'CNN', got {self.family!r}.")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name must be non-empty letters, digits, '-', '_' or '.', got {self.name!r}.")


def _io(sa_def: dict) -> dict:
    return {key: sa_def[key] for key in ("spatial_dims", "in_channels", "out_channels")}


def cnn_models(sa_def: dict, widths: Sequence[int]) -> list[SweepModel]:
    """MONAI ``UNet`` (4 levels, stride 2, two residual units) and ``BasicUNet`` at each first-level width.

    Raises:
        ValueError: a width below 1.
    """
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive, got {list(widths)}.")
    models = []
    for w in widths:
        unet = {"_target_": "monai.networks.nets.UNet", **_io(sa_def), "channels": [w, 2 * w, 4 * w, 8 * w]}
        models.append(SweepModel(f"UNet-{w}", "CNN", unet | {"strides": [2, 2, 2], "num_res_units": 2}))
    for w in widths:
        basic = {"_target_": "monai.networks.nets.BasicUNet", **_io(sa_def), "features": [w, w, 2 * w, 4 * w, 8 * w, w]}
        models.append(SweepModel(f"BasicUNet-{w}", "CNN", basic))
    return models


def default_sweep_models(task: str, bundle_dir: str | os.PathLike | None = None) -> list[SweepModel]:
    """Every SAUNet preset of ``monai_qsa.networks.nets.SAUNET_PRESETS`` and the CNNs of :data:`CNN_WIDTHS`, with the
    input and output channels of the task bundle's network; in 3D the SAUNets attend over the bundle network's
    ``kernel_size`` (3 in ``sa_seg3d``: a 7x7x7 neighbourhood costs 13 times as much).

    Raises:
        ValueError: ``task`` has no sweep.
    """
    from monai_qsa.networks.nets import SAUNET_PRESETS

    if task not in SWEEP_TASKS:
        raise ValueError(f"--sweep runs for {', '.join(SWEEP_TASKS)}, not {task!r}.")
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir(BENCHMARK_TASKS[task])
    sa_def = sa_network_def(bundle)
    kernel = {"kernel_size": sa_def["kernel_size"]} if sa_def["spatial_dims"] == 3 and "kernel_size" in sa_def else {}
    sa = [
        SweepModel(
            f"SAUNet-{preset}", "SA", {"_target_": sa_def["_target_"], **_io(sa_def), "preset": preset, **kernel}
        )
        for preset in SAUNET_PRESETS
    ]
    return sa + cnn_models(sa_def, CNN_WIDTHS)


def _complexity(network: torch.nn.Module, report: dict) -> dict:
    """Parameters, multiply-adds of one network input and stored sizes (fp32 state_dict, int8 file)."""
    from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size

    return {
        "parameters": count_parameters(network),
        "flops": count_flops(network, torch.zeros(1, *report["input_shape"])),
        "fp32_size_bytes": serialized_size(network),
        "int8_size_bytes": serialized_size(int8_path(report)),
    }


def _cached(cache: Path, key: dict, measure: Callable[[], dict], retime: bool) -> dict:
    """``measure()``, or the result stored in ``cache`` under the same ``key`` (unless ``retime``); the result is
    stored there after measuring."""
    if not retime and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["spec"] == key:
            return cached["result"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    result = measure()
    cache.write_text(json.dumps({"spec": key, "result": result}, indent=2))
    return result


def _model_file(spec: dict) -> Path:
    """The file a timing spec loads: the int8 program or the fp32 checkpoint."""
    return Path(spec["int8_path"] if spec["precision"] == "int8" else spec["checkpoint"])


def _timed(run_dir: Path, mode: str, spec: dict, retime: bool) -> dict:
    """The timing of ``spec`` (:mod:`monai_qsa.benchmark.measure`, own process), reused from ``run_dir/timing``
    when the same spec was timed on the same model file."""
    key = {**spec, "model_mtime_ns": _model_file(spec).stat().st_mtime_ns}
    cache = run_dir / "timing" / f"{mode}.json"
    return _cached(cache, key, partial(measure_in_process, spec, cache.parent), retime)


@dataclass(frozen=True)
class _Settings:
    """What every model of one sweep shares."""

    bundle: Path
    dataset: Path
    runs: Path
    seed: int
    max_epochs: int
    stopping: EarlyStopping
    timing: dict  # max_cases, repeats, min_seconds, threads
    compile: bool
    retrain: bool
    retime: bool


def _sweep_model(model: SweepModel, settings: _Settings, bar) -> dict:
    """Train (or reuse), quantise, count and time one model; the bar advances once per stage."""
    run_dir = settings.runs / model.name
    arguments = (
        settings.bundle,
        settings.dataset,
        model.network_def,
        settings.seed,
        settings.max_epochs,
    )
    bar.set_postfix_str(f"train {model.name}")
    earlier = None if settings.retrain else trained_run(run_dir, *arguments, stopping=settings.stopping)
    report = earlier or train_and_quantize(run_dir, *arguments, stopping=settings.stopping)
    bar.update()
    checkpoint = run_dir / "models" / "model.pt"
    network = load_network(str(settings.bundle), str(settings.dataset), model.network_def, str(checkpoint))
    row = {
        "family": model.family,
        "network_def": model.network_def,
        "run_dir": str(run_dir),
        **training_record(run_dir),
        **_complexity(network, report),
        "input_shape": report["input_shape"],
        "fp32_metric": report["fp32_metric"],
        "int8_metric": report["int8_metric"],
        "int8_accepted": bool(report["accepted"]),
        "fp32_file": str(checkpoint),
        "int8_file": str(int8_path(report)),
        "timing": {},
    }
    for mode, (precision, compiled) in (TIMING_MODES if settings.compile else _EAGER_MODES).items():
        bar.set_postfix_str(f"time {model.name} {mode}")
        spec = {
            "name": mode,
            "precision": precision,
            "network_def": model.network_def,
            "checkpoint": str(checkpoint),
            "int8_path": row["int8_file"],
            "compile": compiled,
            "bundle_dir": str(settings.bundle),
            "dataset_dir": str(settings.dataset),
            **settings.timing,
        }
        row["timing"][mode] = _timed(run_dir, mode, spec, settings.retime)
        bar.update()
    return row


def run_sweep(
    task: str,
    output: str | os.PathLike,
    models: Sequence[SweepModel] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    max_epochs: int | None = None,
    patience: int = 2,
    val_interval: int = 1,
    seed: int = 0,
    repeats: int = 5,
    min_seconds: float = 5.0,
    threads: tuple[int, ...] = (1, 2),
    max_cases: int = 4,
    tolerance: float = 0.005,
    volume_shape: Sequence[int] | None = None,
    compile: bool = True,
    retrain: bool = False,
    retime: bool = False,
    bundle_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train, quantise and time every model of the sweep; write ``report.json``, ``report.md`` and the front plots.

    Args:
        task: ``seg2d`` or ``seg3d``.
        output: folder for the report and plots.
        models: the models (default :func:`default_sweep_models`: every SAUNet preset, UNet and BasicUNet at
            :data:`CNN_WIDTHS`); at least one of each family.
        dataset_dir: Decathlon-style dataset; default ``output/data`` (the built-in synthetic one is written if
            missing).
        runs_dir: trained runs, one folder per model, and the end-to-end work folder (default ``output/runs``).
        max_epochs: the most epochs of every model (default: the bundle's ``num_epochs`` for the task, see
            :data:`~monai_qsa.benchmark.tasks.BENCHMARK_TASKS`).
        patience: validations without improvement of the validation Dice before a model's training stops.
        val_interval: epochs between validations.
        seed: training seed (the same for every model).
        repeats: timed passes over the cases per model, run mode and thread count (at least).
        min_seconds: time for at least this long per model, mode and thread count, for the energy reading.
        threads: CPU thread counts to time; comparisons use the largest.
        max_cases: validation cases per timed pass.
        tolerance: the matched-accuracy table takes SA int8 models whose Dice is at least a CNN's minus this.
        volume_shape: size of the synthetic clinical-size volume timed end to end (default 256x256x128 in 3D, 512x512
            in 2D, 1 mm voxels); an empty sequence skips the end-to-end timing.
        compile: time fp32 eager, fp32 compiled and int8 compiled (:data:`TIMING_MODES`); False (no C++ compiler,
            quick runs): fp32 and int8 eager only.
        retrain: train again even where a finished run with the same settings exists.
        retime: time again even where a timing of the same model file with the same settings exists.
        bundle_dir: bundle holding the training and inference recipe (default: the shipped bundle for ``task``).
        progress: show a progress bar over the stages.

    Returns:
        the report (also written to ``output/report.json``).

    Raises:
        ValueError: bad arguments, naming them.
    """
    from tqdm.auto import tqdm

    if task not in SWEEP_TASKS:
        raise ValueError(f"--sweep runs for --task {' or '.join(SWEEP_TASKS)}, got {task!r}.")
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir(BENCHMARK_TASKS[task])
    models = list(models) if models is not None else default_sweep_models(task, bundle)
    _check_arguments(models, max_epochs, repeats, threads, max_cases, tolerance)
    output = Path(output).resolve()
    settings = _Settings(
        bundle=bundle,
        dataset=Path(dataset_dir).resolve() if dataset_dir else output / "data",
        runs=Path(runs_dir).resolve() if runs_dir else output / "runs",
        seed=seed,
        max_epochs=BENCHMARK_TASKS[task].epochs if max_epochs is None else max_epochs,
        stopping=EarlyStopping(patience, val_interval),
        timing={"max_cases": max_cases, "repeats": repeats, "min_seconds": min_seconds, "threads": list(threads)},
        compile=compile,
        retrain=retrain,
        retime=retime,
    )
    spatial_dims = models[0].network_def["spatial_dims"]
    if volume_shape is None:
        volume_shape = (256, 256, 128) if spatial_dims == 3 else (512, 512)
    end_to_end_runs = 3 if volume_shape else 0
    bar = tqdm(
        total=len(models) * (1 + (len(TIMING_MODES) if compile else len(_EAGER_MODES)))
        + sum(model.family == "CNN" for model in models)
        + end_to_end_runs
        + 1,
        desc=f"sweep {task}",
        disable=not progress,
        unit="stage",
    )
    rows = {model.name: _sweep_model(model, settings, bar) for model in models}
    reference = max(threads)
    report = {
        "task": task,
        "metric": BENCHMARK_TASKS[task].metric,
        "metric_split": "validation (held out from training; the best validation checkpoint is the one evaluated)",
        "bundle_dir": str(bundle),
        "dataset_dir": str(settings.dataset),
        "seed": seed,
        "max_epochs": settings.max_epochs,
        "early_stopping": asdict(settings.stopping),
        "compile": compile,
        **settings.timing,
        "reference_threads": reference,
        "tolerance": tolerance,
        "models": rows,
    }
    report["fronts"] = pareto_fronts(report)
    report["paired"] = _paired(report, settings, bar)
    report["matched"] = matched_accuracy_table(report)
    report["end_to_end"] = _end_to_end(report, settings, tuple(volume_shape), bar) if volume_shape else None
    report["machine"] = machine_info()
    bar.set_postfix_str("report")
    write_sweep_report(report, output)
    bar.update()
    bar.close()
    return report


def _check_arguments(
    models: list[SweepModel],
    max_epochs: int | None,
    repeats: int,
    threads: tuple[int, ...],
    max_cases: int,
    tolerance: float,
) -> None:
    families = {model.family for model in models}
    if families != {"SA", "CNN"}:
        raise ValueError(f"models must hold at least one SA and one CNN model, got families {sorted(families)}.")
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}.")
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {max_epochs}.")
    if repeats < 1 or not threads or min(threads) < 1 or max_cases < 1:
        raise ValueError("--repeats, --threads and --max_cases must be at least 1.")
    if tolerance < 0:
        raise ValueError(f"--tolerance must be non-negative, got {tolerance}.")


def _paired_spec(cnn: str, sa: str, report: dict, settings: _Settings) -> dict:
    """The :func:`~monai_qsa.benchmark.measure.measure_alternating` spec of one matched pair (CNN ``cnn``, SA model
    ``sa``): its models in the roles of :data:`~monai_qsa.benchmark.sweep_report.PAIRED_ROLES`, each in its fastest
    mode of the sweep's own timing (``timing_mode``), at the reference thread count, for :data:`PAIRED_ROUNDS` rounds
    of ``min_seconds / PAIRED_ROUNDS`` each."""
    threads = report["reference_threads"]
    modes = TIMING_MODES if settings.compile else _EAGER_MODES
    entries = []
    names = {"cnn": cnn, "sa": sa}
    for role, (member, precision) in PAIRED_ROLES.items():
        model = report["models"][names[member]]
        mode = fastest(model, precision, threads)["mode"]
        entries.append(
            {
                "name": role,
                "timing_mode": mode,
                "precision": precision,
                "network_def": model["network_def"],
                "checkpoint": model["fp32_file"],
                "int8_path": model["int8_file"],
                "compile": modes[mode][1],
            }
        )
    return {
        "name": pair_name(cnn, sa),
        "models": entries,
        "bundle_dir": str(settings.bundle),
        "dataset_dir": str(settings.dataset),
        "max_cases": settings.timing["max_cases"],
        "rounds": PAIRED_ROUNDS,
        "min_seconds": settings.timing["min_seconds"] / PAIRED_ROUNDS,
        "threads": threads,
    }


def _paired(report: dict, settings: _Settings, bar) -> dict:
    """Each matched pair (:func:`~monai_qsa.benchmark.sweep_report.matched_pairs`) timed once more in one process,
    the SA model in int8 and the CNN in fp32 and in int8 in turn, round after round (:func:`_paired_spec`), so that
    the table's ratios do not depend on how fast the machine happened to run when each model was timed on its own.
    Reused from ``runs/paired`` when the same model files were timed with the same settings.

    Returns:
        ``{pair_name(cnn, sa): {role: timing}}``, each timing as
        :func:`~monai_qsa.benchmark.measure.measure_alternating` gives it, plus the sweep's ``timing_mode``.
    """
    paired = {}
    for cnn, sa in matched_pairs(report).items():
        if sa is not None:
            spec = _paired_spec(cnn, sa, report, settings)
            bar.set_postfix_str(f"paired timing {spec['name']}")
            key = {**spec, "model_mtimes_ns": [_model_file(entry).stat().st_mtime_ns for entry in spec["models"]]}
            cache = settings.runs / "paired" / f"{spec['name']}.json"
            result = _cached(cache, key, partial(measure_in_process, spec, cache.parent), settings.retime)
            paired[spec["name"]] = {
                entry["name"]: {**result[entry["name"]], "timing_mode": entry["timing_mode"]}
                for entry in spec["models"]
            }
        bar.update()
    return paired


def _end_to_end(report: dict, settings: _Settings, shape: tuple[int, ...], bar) -> dict:
    """``python -m monai_qsa infer`` on one synthetic clinical-size volume, for the chosen CNN (fp32 in its fastest
    mode, and int8) and its matched SA int8 model, at the reference thread count; volumes, bundle copies and results
    in ``runs/end_to_end``."""
    threads = report["reference_threads"]
    chosen = chosen_models(report)
    runs = []
    for name, precision in ((chosen["cnn"], "fp32"), (chosen["cnn"], "int8"), (chosen["sa"], "int8")):
        row = report["models"][name]
        bar.set_postfix_str(f"end to end {name} {precision}")
        mode = fastest(row, precision, threads)["mode"]
        runs.append(
            {
                "model": name,
                "precision": precision,
                "mode": mode,
                **time_end_to_end(
                    bundle_dir=settings.bundle,
                    network_def=row["network_def"],
                    model_file=Path(row[f"{precision}_file"]),
                    int8=precision == "int8",
                    compile=mode.endswith("compiled"),
                    shape=shape,
                    threads=threads,
                    work_dir=settings.runs / "end_to_end",
                    retime=settings.retime,
                ),
            }
        )
        bar.update()
    return {"shape": list(shape), "spacing_mm": 1.0, "threads": threads, "runs": runs}
