"""Time trained models of the benchmark per case, with their energy per case: one model at several thread counts
(:func:`measure_model`), or a few models in turn, round after round (:func:`measure_alternating`).

Runs in its own process (``python -m monai_qsa.benchmark.measure SPEC.json RESULT.json``) so that the models of
one spec do not share allocator state, compiled-code caches or CodeCarbon trackers with those of another. The cases
are the bundle's validation images after its deterministic preprocessing, run through the bundle's validation
inferer (sliding window for segmentation), exactly as in evaluation.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["measure_model", "measure_alternating", "bundle_workflow", "load_cases", "load_network", "load_model"]


def bundle_workflow(bundle_dir: str, dataset_dir: str, network_def: dict | None = None):
    """The bundle's training config on ``dataset_dir`` as a MONAI ``ConfigWorkflow`` (initialised; nothing is
    trained), with ``bundle_root`` passed explicitly and ``network_def`` swapped in before anything is parsed (so the
    dataset is read once however many items are taken from it)."""
    from monai.bundle import ConfigWorkflow

    configs = Path(bundle_dir) / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_dir),
        dataset_dir=str(dataset_dir),
        **({"network_def": network_def} if network_def else {}),
    )
    workflow.initialize()
    return workflow


def load_cases(workflow, max_cases: int) -> tuple[list[torch.Tensor], object]:
    """The first ``max_cases`` validation images of the bundle ``workflow`` (batch of one, preprocessed) and its
    validation inferer."""
    preprocessing = workflow.val_preprocessing
    datalist = workflow.parser.get_parsed_content("val_datalist")[:max_cases]
    if not datalist:
        raise ValueError(f"the dataset in {workflow.dataset_dir} has no validation cases to time.")
    cases = [torch.as_tensor(preprocessing(dict(item))["image"])[None] for item in datalist]
    return cases, workflow.val_inferer


def load_network(bundle_dir: str, dataset_dir: str, network_def: dict, checkpoint: str) -> nn.Module:
    """``network_def`` built in the bundle's training config (so references such as ``@num_classes`` resolve
    against the dataset), with the weights of ``checkpoint``, in eval mode."""
    return load_model(
        {"precision": "fp32", "checkpoint": checkpoint}, bundle_workflow(bundle_dir, dataset_dir, network_def)
    )


def load_model(spec: dict, workflow) -> nn.Module:
    """The fp32 network (``spec["network_def"]``, already in ``workflow``, + ``checkpoint``) or the int8 graph
    (``int8_path``) of ``spec`` (:func:`monai_qsa.models.runnable_network`)."""
    from monai_qsa.models import runnable_network

    if spec["precision"] == "int8":
        return runnable_network(spec["int8_path"], int8=True)
    return runnable_network(spec["checkpoint"], workflow.network_def)


def _timed_pass(cases: list[torch.Tensor], inferer, runner: nn.Module) -> list[float]:
    """Milliseconds of each case through ``inferer(case, runner)``, one pass over ``cases``."""
    times = []
    for case in cases:
        start = time.perf_counter()
        inferer(case, runner)
        times.append(round(1000 * (time.perf_counter() - start), 3))
    return times


def _runner(spec: dict, model: nn.Module) -> nn.Module:
    """``model`` (that of ``spec``) as it is timed: compiled (int8 graphs with freezing) when ``spec["compile"]``."""
    from monai_qsa.utils.compile import compile_for_cpu

    return compile_for_cpu(model, freezing=spec["precision"] == "int8") if spec["compile"] else model


def measure_model(spec: dict) -> dict:
    """Per-case latency and energy of one model at each thread count of ``spec["threads"]``.

    Args:
        spec: ``precision`` (``fp32``/``int8``), ``network_def`` and ``checkpoint`` (fp32) or ``int8_path``,
            ``compile`` (run through ``compile_for_cpu``; int8 graphs with freezing), ``bundle_dir``,
            ``dataset_dir``, ``max_cases``, ``repeats`` (at least this many timed passes over the cases),
            ``min_seconds`` (and passes until this much time has gone, for the energy reading), ``threads``.

    Returns:
        ``{"<threads>": {"latency_ms": [...], "median_ms", "energy_j_per_case", "energy_method"}, "cases": n,
        "mode": see :func:`~monai_qsa.utils.compile.run_mode`}``; energy entries are None when CodeCarbon could not
        measure.
    """
    from monai_qsa.utils.compile import run_mode
    from monai_qsa.utils.energy import EnergyMeter, measure_energy

    workflow = bundle_workflow(spec["bundle_dir"], spec["dataset_dir"], spec["network_def"])
    cases, inferer = load_cases(workflow, spec["max_cases"])
    model = load_model(spec, workflow)
    result: dict = {"cases": len(cases)}
    with EnergyMeter() as meter:
        for threads in spec["threads"]:
            torch.set_num_threads(threads)  # TorchDynamo guards on it: compiled code is compiled again per count
            runner = _runner(spec, model)
            times = []
            with torch.no_grad():
                for case in cases:  # warm-up: compilation (per input shape) and allocator caches
                    inferer(case, runner)
                    inferer(case, runner)
                # at least `repeats` passes, and more until `min_seconds` have passed: CodeCarbon samples power about
                # once a second, so shorter windows give meaningless energy figures
                began = time.perf_counter()
                with measure_energy(meter=meter) as energy:
                    passes = 0
                    while passes < spec["repeats"] or time.perf_counter() - began < spec["min_seconds"]:
                        times += _timed_pass(cases, inferer, runner)
                        passes += 1
                    energy.samples = len(times)
            reading = energy.reading
            result["mode"] = run_mode(runner)
            result[str(threads)] = {
                "latency_ms": times,
                "median_ms": statistics.median(times),
                "energy_j_per_case": reading.joules_per_sample if reading else None,
                "energy_method": reading.method if reading else "unavailable (CodeCarbon failed; see the log)",
            }
    return result


def measure_alternating(spec: dict) -> dict:
    """Per-case latency and energy of a few models timed in turn in one process, round after round, the order
    turning each round (:func:`~monai_qsa.utils.timing.in_turn`): changes in the machine's speed while they run
    then reach every model alike, which timings taken minutes apart in separate processes cannot promise. The fair
    way to compare models' latency on a shared machine.

    Args:
        spec: ``models``, each with ``name``, ``precision``, ``network_def``, ``checkpoint`` or ``int8_path`` and
            ``compile`` as in :func:`measure_model`; ``bundle_dir``, ``dataset_dir``, ``max_cases``, ``rounds``,
            ``min_seconds`` (per model and round: one pass over the cases, and more until this much time has gone;
            also the window of each energy reading, summed over the rounds), ``threads`` (one count).

    Returns:
        ``{name: {"latency_ms": [...], "median_ms", "round_medians_ms": [...], "energy_j_per_case",
        "energy_method", "mode"}}``: latency and energy over all rounds; energy None when CodeCarbon could not
        measure.
    """
    from monai_qsa.utils.compile import run_mode
    from monai_qsa.utils.energy import EnergyMeter, measure_energy
    from monai_qsa.utils.timing import in_turn

    torch.set_num_threads(spec["threads"])
    runners, cases, inferer = {}, None, None
    for model in spec["models"]:
        workflow = bundle_workflow(spec["bundle_dir"], spec["dataset_dir"], model["network_def"])
        if cases is None:
            cases, inferer = load_cases(workflow, spec["max_cases"])
        runners[model["name"]] = _runner(model, load_model(model, workflow))
    with torch.no_grad(), EnergyMeter() as meter:
        for runner in runners.values():  # warm-up: compilation (per input shape) and allocator caches
            _timed_pass(cases, inferer, runner)
            _timed_pass(cases, inferer, runner)

        def window(name: str) -> tuple[list[float], object]:
            """One round of ``name``: passes over the cases for ``min_seconds``, and their energy reading."""
            times: list[float] = []
            began = time.perf_counter()
            with measure_energy(meter=meter) as energy:
                while not times or time.perf_counter() - began < spec["min_seconds"]:
                    times += _timed_pass(cases, inferer, runners[name])
                energy.samples = len(times)
            return times, energy.reading

        measured_rounds = in_turn(window, list(runners), spec["rounds"])
    result = {}
    for name, runner in runners.items():
        rounds = [times for times, _ in measured_rounds[name]]
        readings = [reading for _, reading in measured_rounds[name]]
        times = [t for window_times in rounds for t in window_times]
        measured = None if None in readings else sum(readings[1:], readings[0])
        result[name] = {
            "latency_ms": times,
            "median_ms": statistics.median(times),
            "round_medians_ms": [statistics.median(window_times) for window_times in rounds],
            "energy_j_per_case": measured.joules_per_sample if measured else None,
            "energy_method": measured.method if measured else "unavailable (CodeCarbon failed; see the log)",
            "mode": run_mode(runner),
        }
    return result


def main(argv: list[str]) -> int:
    spec_path, output_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    result = measure_alternating(spec) if "models" in spec else measure_model(spec)
    output_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
