"""``python -m monai_qsa benchmark``: train a CNN baseline and the SA model with the same recipe, quantise both,
and measure CNN fp32/int8 and SA fp32/int8 side by side (the paper's table, on this machine)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from monai_qsa.benchmark.measure import load_network
from monai_qsa.benchmark.report import machine_info, relative_figures, write_report
from monai_qsa.benchmark.tasks import BENCHMARK_TASKS, cnn_network_def, default_bundle_dir, sa_network_def
from monai_qsa.benchmark.train import train_and_quantize, trained_run

__all__ = ["run_benchmark", "MODELS", "run_in_process", "measure_in_process", "int8_path"]

#: the two trained models, in table order
MODELS = ("cnn", "sa")


def int8_path(report: dict) -> Path:
    """The int8 file the quantisation step wrote, deployable or rejected by the metric-drop gate."""
    return Path(report.get("artifact") or report["rejected_artifact"])


def run_in_process(module: str, spec: dict, spec_path: Path, result_path: Path, what: str) -> dict:
    """``python -m module spec_path result_path`` in a fresh process (``spec`` written to ``spec_path`` first); the
    JSON it writes to ``result_path``.

    Raises:
        RuntimeError: the process failed, naming ``what`` and quoting the end of its error output.
    """
    spec_path.write_text(json.dumps(spec))
    completed = subprocess.run(
        [sys.executable, "-m", module, str(spec_path), str(result_path)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{completed.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def measure_in_process(spec: dict, work_dir: Path) -> dict:
    """Run :func:`monai_qsa.benchmark.measure.measure_model` (or, for a spec with ``models``,
    :func:`~monai_qsa.benchmark.measure.measure_alternating`) for ``spec`` in a fresh process (its spec and result
    files are written to ``work_dir``, named after ``spec["name"]``).

    Raises:
        RuntimeError: the timing process failed, with the end of its error output.
    """
    name = spec["name"]
    spec_path, result_path = work_dir / f"{name}.spec.json", work_dir / f"{name}.result.json"
    return run_in_process("monai_qsa.benchmark.measure", spec, spec_path, result_path, f"timing {name}")


def _summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _complexity_rows(name: str, network: torch.nn.Module, report: dict, checkpoint: Path) -> dict:
    """Parameters, FLOPs (multiply-adds of one network input) and stored size of the fp32 and int8 models."""
    from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size

    example = torch.zeros(1, *report["input_shape"])
    parameters, flops = count_parameters(network), count_flops(network, example)
    int8_file = int8_path(report)
    return {
        f"{name}_fp32": {
            "parameters": parameters,
            "flops": flops,
            "size_bytes": serialized_size(network),
            "file": str(checkpoint),
        },
        f"{name}_int8": {
            "parameters": parameters,
            "flops": flops,
            "size_bytes": serialized_size(int8_file),
            "file": str(int8_file),
            "accepted": bool(report["accepted"]),
        },
    }


def run_benchmark(
    task: str,
    output: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    seeds: tuple[int, ...] = (0,),
    repeats: int = 5,
    min_seconds: float = 5.0,
    threads: tuple[int, ...] = (1, 2),
    max_cases: int = 4,
    baseline: str = "matched",
    retrain: bool = False,
    compile: bool = True,
    bundle_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train, quantise and measure CNN and SA models for ``task``; write ``report.json``, ``report.md`` and plots.

    Args:
        task: ``cls``, ``seg2d`` or ``seg3d``.
        output: folder for the trained runs (``runs/<cnn|sa>/seed<k>``), the report and plots.
        dataset_dir: Decathlon-style dataset; default ``output/data``, where the built-in synthetic dataset is
            written if missing.
        epochs: training epochs of both models (default per task, see
            :data:`~monai_qsa.benchmark.tasks.BENCHMARK_TASKS`).
        seeds: training seeds; the metric is reported as mean ± std over them, the timings use the first seed's models.
        repeats: timed passes over the cases per model and thread count (at least).
        min_seconds: keep timing passes until this long has passed, so that CodeCarbon (sampling power about once a
            second) measures a window long enough for a per-case energy figure.
        threads: CPU thread counts to time.
        max_cases: validation cases timed per pass.
        baseline: ``matched`` or ``standard`` CNN (see :func:`~monai_qsa.benchmark.tasks.cnn_network_def`).
        retrain: train again even where a finished run of the same seed exists.
        compile: run int8 models compiled (the deployed path); fp32 models run eagerly, as the bundles deploy them.
        bundle_dir: bundle holding the training recipe (default: this repository's bundle for ``task``).
        progress: show a progress bar over the stages.

    Returns:
        the report (also written to ``output/report.json``).

    Raises:
        ValueError: bad arguments, naming them.
    """
    from tqdm.auto import tqdm

    if task not in BENCHMARK_TASKS:
        raise ValueError(f"--task must be one of {sorted(BENCHMARK_TASKS)}, got {task!r}.")
    spec = BENCHMARK_TASKS[task]
    if not seeds or repeats < 1 or not threads or min(threads) < 1 or max_cases < 1:
        raise ValueError("--seeds needs at least one seed; --repeats, --threads and --max_cases must be at least 1.")
    epochs = spec.epochs if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}.")
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir(spec)
    if not (bundle / "configs" / "train.json").is_file():
        raise ValueError(f"--bundle_dir {bundle} has no configs/train.json.")
    output = Path(output).resolve()
    dataset = Path(dataset_dir).resolve() if dataset_dir else output / "data"
    sa_def = sa_network_def(bundle)
    definitions = {"cnn": cnn_network_def(sa_def, baseline), "sa": sa_def}

    # stages: one training per model and seed, one timing per model and precision, the report
    bar = tqdm(
        total=len(seeds) * len(MODELS) + 2 * len(MODELS) + 1,
        desc=f"benchmark {task}",
        disable=not progress,
        unit="stage",
    )
    reports: dict[str, dict[int, dict]] = {m: {} for m in MODELS}
    for seed in seeds:
        for model in MODELS:
            run_dir = output / "runs" / model / f"seed{seed}"
            bar.set_postfix_str(f"train {model} seed {seed}")
            arguments = (bundle, dataset, definitions[model], seed, epochs)
            earlier = None if retrain else trained_run(run_dir, *arguments)
            reports[model][seed] = earlier or train_and_quantize(run_dir, *arguments)
            bar.update()

    rows: dict[str, dict] = {}
    first = seeds[0]
    with tempfile.TemporaryDirectory(dir=output) as work:
        for model in MODELS:
            report = reports[model][first]
            checkpoint = output / "runs" / model / f"seed{first}" / "models" / "model.pt"
            network = load_network(str(bundle), str(dataset), definitions[model], str(checkpoint))
            rows.update(_complexity_rows(model, network, report, checkpoint))
            for precision in ("fp32", "int8"):
                name = f"{model}_{precision}"
                bar.set_postfix_str(f"time {name}")
                timing_spec = {
                    "name": name,
                    "precision": precision,
                    "network_def": definitions[model],
                    "checkpoint": str(checkpoint),
                    "int8_path": str(int8_path(report)),
                    "compile": compile and precision == "int8",
                    "bundle_dir": str(bundle),
                    "dataset_dir": str(dataset),
                    "max_cases": max_cases,
                    "repeats": repeats,
                    "min_seconds": min_seconds,
                    "threads": list(threads),
                }
                rows[name]["timing"] = measure_in_process(timing_spec, Path(work))
                rows[name]["metric"] = _summary([reports[model][s][f"{precision}_metric"] for s in seeds])
                bar.update()

    result = {
        "task": task,
        "metric": spec.metric,
        "metric_split": "validation (held out from training; the best validation checkpoint is the one evaluated)",
        "epochs": epochs,
        "seeds": list(seeds),
        "baseline": baseline,
        "networks": definitions,
        "dataset_dir": str(dataset),
        "repeats": repeats,
        "min_seconds": min_seconds,
        "threads": list(threads),
        "flops_input_shape": reports["sa"][first]["input_shape"],
        "models": rows,
        "relative": relative_figures(rows, max(threads)),
        "machine": machine_info(),
    }
    bar.set_postfix_str("report")
    write_report(result, output)
    bar.update()
    bar.close()
    return result
