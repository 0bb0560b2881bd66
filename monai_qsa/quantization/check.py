"""Quantise a trained network to int8 and check it against fp32 before deploying it: calibration on a bounded
number of network-input patches, one evaluation per precision, complexity and latency figures, acceptance by the
metric drop, and the artifact and JSON report written without ever leaving a partial file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.data.utils import dense_patch_slices
from monai.transforms import ResizeWithPadOrCrop, SpatialPad
from monai.utils import fall_back_tuple
from torch import nn

from monai_qsa.quantization.calibration import calibration_tensors
from monai_qsa.quantization.ptq import quantize_ptq
from monai_qsa.quantization.serialization import save_quantized
from monai_qsa.utils.compile import compile_for_cpu, run_mode
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size
from monai_qsa.utils.files import atomic_write
from monai_qsa.utils.timing import repeated_seconds

if TYPE_CHECKING:
    from ignite.metrics import Metric
    from monai.engines import SupervisedEvaluator

__all__ = [
    "QuantizationReport",
    "QuantizationFailedError",
    "quantize_and_check",
    "calibration_patches",
    "network_input",
    "evaluation_twin",
    "twin_evaluation",
    "higher_is_better",
    "weights_fingerprint",
    "withdraw_artifact",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizationReport:
    """What :func:`quantize_and_check` found and decided; written as JSON (:meth:`write`).

    ``metric_drop`` is how much worse int8 is than fp32 (``fp32 - int8`` when higher is better, ``int8 - fp32``
    otherwise); ``seconds`` times each stage; ``latency`` is None when timing was turned off; ``error`` is set (and
    nothing is accepted) when the step failed.
    """

    backend: str
    accepted: bool = False
    reason: str = ""
    key_metric: str | None = None
    higher_is_better: bool = True
    fp32_metric: float | None = None
    fp32_metric_source: str | None = None
    int8_metric: float | None = None
    metric_drop: float | None = None
    max_metric_drop: float | None = None
    artifact: str | None = None
    rejected_artifact: str | None = None
    checkpoint: str | None = None
    input_shape: list[int] | None = None
    calibration_patches: int | None = None
    parameters: int | None = None
    flops: int | None = None
    fp32_state_dict_bytes: int | None = None
    int8_bytes: int | None = None
    size_ratio: float | None = None
    latency: dict | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON to ``path`` (atomically)."""
        with atomic_write(path) as partial:
            partial.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)


class QuantizationFailedError(RuntimeError):
    """The int8 step failed (e.g. a network torch.export cannot capture); ``report`` (already written) says why."""

    def __init__(self, report: QuantizationReport) -> None:
        super().__init__(report.error)
        self.report = report


def network_input(case: torch.Tensor, inferer: Callable | None) -> torch.Tensor:
    """What the network itself receives when ``inferer`` runs on the batch ``case``: a patch of the sliding window's
    ``roi_size`` (cropped or padded from the centre of each case), else the case. Used as the export example, so that
    networks exportable only for some sizes (MONAI ``UNet``) are captured at the size they will see."""
    roi_size = getattr(inferer, "roi_size", None)
    if roi_size is None:
        return case
    patch = ResizeWithPadOrCrop(fall_back_tuple(roi_size, case.shape[2:]))
    return torch.stack([torch.as_tensor(patch(sample)) for sample in case])


def _evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread over ``items`` (the centres of ``count`` equal bins), or all of them."""
    if count >= len(items):
        return items
    return [items[(2 * i + 1) * len(items) // (2 * count)] for i in range(count)]


def _case_patches(sample: torch.Tensor, roi_size: tuple | None, overlap: float, count: int) -> list[torch.Tensor]:
    """Up to ``count`` of the sliding-window patches of one channel-first ``sample``, spread over the image."""
    if roi_size is None:
        return [sample]
    roi_size = fall_back_tuple(roi_size, sample.shape[1:])
    sample = torch.as_tensor(SpatialPad(roi_size)(sample))  # the sliding window pads small images the same way
    image_size = sample.shape[1:]
    interval = [roi if roi == size else max(int(roi * (1 - overlap)), 1) for roi, size in zip(roi_size, image_size)]
    windows = dense_patch_slices(image_size, roi_size, interval)
    return [sample[(slice(None), *window)] for window in _evenly_spaced(windows, count)]


def calibration_patches(
    calibration_data: Iterable,
    inferer: Callable | None = None,
    max_patches: int | None = 32,
    num_batches: int | None = None,
    image_key: str = "image",
) -> Iterator[torch.Tensor]:
    """Batches of what the network sees, to calibrate static quantisation on, at a bounded cost.

    With a sliding-window ``inferer`` (anything with ``roi_size``) these are its patches, ``max_patches`` in all,
    spread evenly over the cases and over each image (so calibration sees foreground and background, not one
    corner); otherwise the images themselves, ``max_patches`` of them. Batches hold the inferer's
    ``sw_batch_size`` patches (else the loader's batch).

    Args:
        calibration_data: tensors, ``(input, target)`` pairs or MONAI dict batches (e.g. the validation loader).
        inferer: the inferer the network runs under (e.g. MONAI ``SlidingWindowInferer``).
        max_patches: at most this many network inputs (None: every window of every case).
        num_batches: read at most this many batches of ``calibration_data``.
        image_key: input key of dict batches.
    """
    roi_size, overlap = getattr(inferer, "roi_size", None), float(getattr(inferer, "overlap", 0.25) or 0.0)
    budget = sys.maxsize if max_patches is None else max_patches
    expected_batches = min(
        filter(None, (len(calibration_data) if isinstance(calibration_data, Sized) else None, num_batches)),
        default=None,
    )
    per_case, pending = None, []
    for batch in calibration_tensors(calibration_data, num_batches, image_key):
        chunk = max(int(getattr(inferer, "sw_batch_size", 1) or 1), 1) if roi_size is not None else len(batch)
        if per_case is None:  # spread the budget over the cases the data is expected to hold
            spread = max_patches is not None and expected_batches is not None
            per_case = max(math.ceil(budget / (expected_batches * len(batch))), 1) if spread else budget
        for sample in batch:
            for patch in _case_patches(sample, roi_size, overlap, min(per_case, budget)):
                pending.append(patch)
                budget -= 1
                if len(pending) == chunk:
                    yield torch.stack(pending)
                    pending = []
            if budget <= 0:
                break
        if budget <= 0:
            break
    if pending:
        yield torch.stack(pending)


def higher_is_better(metric_cmp_fn: Callable[[float, float], bool]) -> bool:
    """Whether a MONAI ``metric_cmp_fn(current, best)`` (True: ``current`` is better) prefers higher values.

    Raises:
        ValueError: it prefers neither (or both) of 1 over 0 and 0 over 1.
    """
    prefers_higher, prefers_lower = bool(metric_cmp_fn(1.0, 0.0)), bool(metric_cmp_fn(0.0, 1.0))
    if prefers_higher == prefers_lower:
        raise ValueError(f"metric_cmp_fn {metric_cmp_fn!r} must prefer either higher or lower metric values.")
    return prefers_higher


def weights_fingerprint(network: nn.Module) -> str:
    """A digest of ``network``'s ``state_dict`` (names, dtypes, shapes and values): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def evaluation_twin(
    evaluator: SupervisedEvaluator,
    network: nn.Module,
    key_metric: dict[str, Metric],
    postprocessing: Callable | None = None,
) -> SupervisedEvaluator:
    """A fresh CPU ``SupervisedEvaluator`` that evaluates ``network`` as ``evaluator`` does (same data, batch
    preparation and inferer) with the given ``postprocessing`` and ``key_metric`` (the evaluator's own: pass the
    same config), but without the evaluator's handlers, so its checkpoint savers, loggers and energy meters are not
    triggered by the extra runs."""
    from monai.engines import SupervisedEvaluator

    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=evaluator.data_loader,
        network=network,
        prepare_batch=evaluator.prepare_batch,
        inferer=evaluator.inferer,
        postprocessing=postprocessing,
        key_val_metric=key_metric,  # may be shared with the evaluator: Ignite resets a metric when an epoch starts
        to_kwargs=evaluator.to_kwargs,
    )


def twin_evaluation(
    evaluator: SupervisedEvaluator, key_metric: dict[str, Metric], postprocessing: Callable | None = None
) -> Callable[[nn.Module], float]:
    """``evaluate(network) -> key metric`` through an :func:`evaluation_twin` of ``evaluator``."""

    def evaluate(network: nn.Module) -> float:
        twin = evaluation_twin(evaluator, network, key_metric, postprocessing)
        twin.run()
        return float(twin.state.metrics[twin.state.key_metric_name])

    return evaluate


class _Stopwatch:
    """Seconds spent per stage, accumulated into ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.began = time.perf_counter()

    def time(self, stage: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = fn()
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        return result

    def total(self) -> dict[str, float]:
        return self.seconds | {"total": round(time.perf_counter() - self.began, 3)}


def _latency(example: torch.Tensor, fp32: nn.Module, int8: nn.Module, repeats: int, warmup: int) -> dict:
    """Median and individual latencies (ms) of one network input, fp32 vs int8."""
    runs = {}
    with torch.no_grad():
        for label, model in (("fp32", fp32), ("int8", int8)):
            seconds = repeated_seconds(lambda model=model: model(example), repeats, warmup=warmup)
            runs[label] = [round(1000 * s, 3) for s in seconds]
    fp32_ms, int8_ms = statistics.median(runs["fp32"]), statistics.median(runs["int8"])
    return {
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "ratio": int8_ms / fp32_ms,
        "fp32_runs_ms": runs["fp32"],
        "int8_runs_ms": runs["int8"],
        "threads": torch.get_num_threads(),
        "fp32_mode": run_mode(fp32),
        "int8_mode": run_mode(int8),
        "per": f"one network input of shape {list(example.shape)}",
    }


def withdraw_artifact(report: QuantizationReport, deployable: Path, why: str) -> None:
    """Remove the deployable file (an earlier run's, or this run's own when a later step failed): it does not hold a
    model of this run's network that passed the check, so it must not be deployed. Raises OSError if it stays."""
    if report.artifact == str(deployable):
        report.artifact = None
    if deployable.exists():
        deployable.unlink(missing_ok=True)
        logger.warning(f"removed {deployable}: {why}; it is not deployed with this run's network.")


def _write_report(report: QuantizationReport, path: Path) -> None:
    """Write the report of a failed step; a failure to write it is logged, not raised over the step's own error."""
    try:
        report.write(path)
    except Exception as error:
        logger.error(f"int8 quantisation report {path} could not be written ({type(error).__name__}: {error}).")


def _save(
    report: QuantizationReport, qmodel: nn.Module, example: torch.Tensor, deployable: Path, metadata: dict
) -> None:
    """Write the int8 model: under the deployable name if accepted (replacing an earlier run's file in one step), as
    ``*.rejected*`` otherwise (for inspection); ``x86_eager`` models cannot be saved. When this run's model is not
    written under the deployable name, a deployable file of an earlier run is removed."""
    if not report.accepted:
        withdraw_artifact(report, deployable, "this run's int8 model was rejected")
    elif report.backend != "x86_inductor":
        withdraw_artifact(report, deployable, f"this run's accepted int8 model ({report.backend}) cannot be saved")
    if report.backend != "x86_inductor":
        report.reason += f"; {report.backend} models cannot be saved"
        report.int8_bytes = serialized_size(qmodel)
    else:
        target = (
            deployable if report.accepted else deployable.with_name(f"{deployable.stem}.rejected{deployable.suffix}")
        )
        stored = {"key_metric": report.key_metric, "int8_metric": report.int8_metric, "fp32_metric": report.fp32_metric}
        save_quantized(target, qmodel, example, metadata=stored | metadata)
        report.int8_bytes = serialized_size(target)
        report.artifact, report.rejected_artifact = (str(target), None) if report.accepted else (None, str(target))
        logger.info(f"int8 model written to {target} ({report.int8_bytes} bytes): {report.reason}")
    report.size_ratio = report.int8_bytes / report.fp32_state_dict_bytes


def _decide(report: QuantizationReport, fp32_metric: float, int8_metric: float) -> None:
    """Fill in the metrics, the drop (positive: int8 is worse) and whether it is within ``max_metric_drop``."""
    report.fp32_metric, report.int8_metric = fp32_metric, int8_metric
    report.metric_drop = fp32_metric - int8_metric if report.higher_is_better else int8_metric - fp32_metric
    report.accepted = report.metric_drop <= report.max_metric_drop
    if report.accepted:
        report.reason = f"metric drop {report.metric_drop:.4f} <= {report.max_metric_drop}"
    else:
        report.reason = f"metric drop {report.metric_drop:.4f} > max_metric_drop {report.max_metric_drop}: not deployed"
        logger.warning(f"int8 model rejected: {report.reason} (fp32 {fp32_metric:.4f}, int8 {int8_metric:.4f}).")


def quantize_and_check(
    network: nn.Module,
    evaluate: Callable[[nn.Module], float],
    calibration_data: Iterable,
    output_dir: str | os.PathLike,
    inferer: Callable | None = None,
    key_metric: str = "metric",
    metric_higher_is_better: bool = True,
    fp32_metric: float | None = None,
    fp32_metric_source: str = "given",
    backend: str = "x86_inductor",
    int8_conv3d: bool = False,
    max_metric_drop: float = 0.01,
    max_calibration_patches: int | None = 32,
    num_calibration_batches: int | None = None,
    latency_repeats: int = 3,
    compile: bool = True,
    artifact_name: str = "model_int8.pt2",
    report_name: str = "quantization_report.json",
    metadata: dict | None = None,
    image_key: str = "image",
    checkpoint: str | os.PathLike | None = None,
) -> QuantizationReport:
    """Quantise ``network`` to int8 (:func:`~monai_qsa.quantization.quantize_ptq`), keep it only if its metric holds
    up against fp32, and write ``output_dir/report_name`` (JSON) in any case.

    1. calibrates on at most ``max_calibration_patches`` network inputs (:func:`calibration_patches`); the export
       example is the centre patch of the first case (:func:`network_input`),
    2. evaluates int8 once, and fp32 once unless ``fp32_metric`` is given (e.g. the last validation of the same
       weights), both eagerly,
    3. counts parameters, FLOPs (multiply-accumulates of one network input), fp32 ``state_dict`` and int8 sizes,
       and times one network input fp32 vs int8 (``latency_repeats`` runs; 0 turns timing off),
    4. accepts int8 if it is worse than fp32 by at most ``max_metric_drop``, and writes it as
       ``output_dir/artifact_name``; a rejected model is written as ``*.rejected.pt2``. When the model is rejected
       or any step fails (the report's writing included), the deployable file is removed (an earlier run's, or this
       run's own), so it is never deployed with this run's network.

    Args:
        network: the trained fp32 network (on the CPU, eval mode); left unchanged.
        evaluate: returns the key metric of a network given to it (e.g. :func:`twin_evaluation`).
        calibration_data: batches to calibrate on (tensors, ``(input, target)`` pairs or MONAI dict batches).
        output_dir: folder for the artifact and report, created if missing.
        inferer: the inferer the network runs under; a sliding window's ``roi_size`` sets the calibration patches.
        key_metric: the metric's name, for the report.
        metric_higher_is_better: direction of the metric (see :func:`higher_is_better`).
        fp32_metric: the fp32 network's metric if already known; evaluated otherwise.
        fp32_metric_source: where ``fp32_metric`` comes from, for the report.
        backend: ``"x86_inductor"`` (deployable file) or ``"x86_eager"`` (no file: torch.export cannot capture it).
        int8_conv3d: compute 3D convolutions in int8 (see :func:`~monai_qsa.quantization.quantize_ptq`): faster or
            slower depending on the network, measure it (docs/quantization.md).
        max_metric_drop: largest accepted worsening of the metric, int8 vs fp32 (absolute, >= 0).
        max_calibration_patches: calibrate on at most this many network inputs (None: all windows of all cases).
        num_calibration_batches: read at most this many batches of ``calibration_data``.
        latency_repeats: timed runs per latency median; 0 skips timing.
        compile: time the latency through :func:`monai_qsa.utils.compile.compile_for_cpu` (the deployed way; adds
            compilation time) rather than eagerly. Both metrics are evaluated eagerly either way: compiling changes
            the results by rounding only, and int8 graphs compile once per input shape.
        artifact_name: file name of the int8 model.
        report_name: file name of the JSON report.
        metadata: extra entries stored in the artifact (e.g. labels).
        image_key: input key of dict batches.
        checkpoint: the checkpoint ``network`` was loaded from, for the report.

    Returns:
        the report, as written.

    Raises:
        ValueError: a bad argument.
        QuantizationFailedError: the quantisation itself failed (or its report could not be written); the report
            holding the error has been written if it could be (a failure to write it is logged).
    """
    if max_metric_drop < 0:
        raise ValueError(f"max_metric_drop must be >= 0, got {max_metric_drop}.")
    if latency_repeats < 0:
        raise ValueError(f"latency_repeats must be >= 0 (0: no timing), got {latency_repeats}.")
    report = QuantizationReport(
        backend, key_metric=key_metric, higher_is_better=metric_higher_is_better, max_metric_drop=max_metric_drop
    )
    report.checkpoint = None if checkpoint is None else str(checkpoint)
    deployable, report_path = Path(output_dir) / artifact_name, Path(output_dir) / report_name
    stopwatch = _Stopwatch()
    try:
        example = network_input(next(calibration_tensors(calibration_data, 1, image_key)).to("cpu"), inferer)
        report.input_shape = list(example.shape[1:])
        patches = list(
            calibration_patches(calibration_data, inferer, max_calibration_patches, num_calibration_batches, image_key)
        )
        report.calibration_patches = sum(len(batch) for batch in patches)
        logger.info(f"int8 quantisation ({backend}): calibrating on {report.calibration_patches} network inputs")
        qmodel = stopwatch.time(
            "calibration", lambda: quantize_ptq(network, patches, example, backend=backend, int8_conv3d=int8_conv3d)
        )
        report.fp32_metric_source = fp32_metric_source if fp32_metric is not None else "evaluated"
        logger.info(f"int8 quantisation: calibrated in {stopwatch.seconds['calibration']:.0f} s")
        # evaluated as they are, not compiled: compiling changes the results by rounding only (fused fp32 arithmetic,
        # int8 requantisations), but int8 graphs compile once per input shape, i.e. per batch size of the
        # evaluation's sliding windows (sa_seg: 9.6 s of compiling for a 0.16 s evaluation). Deployment compiles;
        # a graph Inductor cannot compile then runs eagerly with one warning (CompiledForCPU)
        if fp32_metric is None:
            logger.info("int8 quantisation: evaluating the fp32 model")
            fp32_metric = stopwatch.time("fp32_evaluation", lambda: evaluate(network))
        logger.info("int8 quantisation: evaluating the int8 model")
        int8_metric = stopwatch.time("int8_evaluation", lambda: evaluate(qmodel))
        _decide(report, float(fp32_metric), float(int8_metric))
        report.parameters, report.flops = count_parameters(network), count_flops(network, example[:1])
        report.fp32_state_dict_bytes = serialized_size(network)
        if latency_repeats:
            # torch.ao eager int8 modules (x86_eager) run as they are: that backend is for machines without a compiler
            int8_runner = compile_for_cpu(qmodel, freezing=True) if compile and backend == "x86_inductor" else qmodel
            fp32_runner = compile_for_cpu(network) if compile else network
            logger.info(
                f"int8 quantisation: timing one network input {latency_repeats} times per model"
                + (" (compiling first)" if compile else "")
            )
            warmup = 2 if compile else 1  # compiled: the first call compiles, the second may specialise
            report.latency = stopwatch.time(
                "latency", lambda: _latency(example[:1], fp32_runner, int8_runner, latency_repeats, warmup)
            )
        stopwatch.time("save", lambda: _save(report, qmodel, example, deployable, metadata or {}))
        report.seconds = stopwatch.total()
        report.write(report_path)
    except BaseException as error:  # KeyboardInterrupt too: never leave a deployable file this run did not accept
        report.accepted, report.error = False, f"{type(error).__name__}: {error}"
        try:
            withdraw_artifact(report, deployable, "this run's int8 step failed")
        except OSError as remove_error:
            problem = f"{deployable} could not be removed ({type(remove_error).__name__}: {remove_error})"
            logger.error(f"{problem}: it does not hold a checked int8 model of this run's network; do not deploy it.")
            report.error += f"; {problem}"
        report.seconds = stopwatch.total()
        _write_report(report, report_path)
        if not isinstance(error, Exception):
            raise
        raise QuantizationFailedError(report) from error
    return report
