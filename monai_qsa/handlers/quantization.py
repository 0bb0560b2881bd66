"""Ignite handler that quantises the trained network to int8 at the end of a run, checks its metric against
fp32 with the run's own evaluation, and writes the deployable artifact with a report."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.transforms import ResizeWithPadOrCrop
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_qsa.quantization import quantize_ptq, save_quantized
from monai_qsa.quantization.ptq import calibration_tensors
from monai_qsa.utils.compile import compile_for_cpu, run_mode
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size
from monai_qsa.utils.timing import repeated_seconds

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.metrics import Metric
    from monai.engines import Evaluator, SupervisedEvaluator
    from monai.engines.utils import IterationEvents
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    Evaluator, _ = optional_import("monai.engines", name="Evaluator")
    SupervisedEvaluator, _ = optional_import("monai.engines", name="SupervisedEvaluator")
    IterationEvents, _ = optional_import("monai.engines.utils", name="IterationEvents")

__all__ = ["PostTrainingQuantizationHandler", "evaluation_twin", "load_network_weights"]


def load_network_weights(network: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint written by MONAI's ``CheckpointSaver`` into ``network``: either the network's own
    ``state_dict`` (one object saved) or a dict holding it under some key (several objects saved)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    expected = set(network.state_dict())
    if not expected <= set(state):
        nested = [value for value in state.values() if isinstance(value, dict) and expected <= set(value)]
        if not nested:
            raise ValueError(f"checkpoint {checkpoint} holds no state_dict of {type(network).__name__} (keys: {sorted(state)[:6]}).")
        state = nested[0]
    network.load_state_dict(state)


def _attached_metrics(evaluator: Evaluator) -> dict[str, Metric]:
    """The Ignite metrics attached to ``evaluator`` by name (Ignite keeps no public list of them)."""
    metrics = {}
    for handler, args, _ in evaluator._event_handlers.get(Events.EPOCH_COMPLETED, []):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, Metric) and handler.__name__ == "completed":
            metrics[next(arg for arg in args if isinstance(arg, str))] = owner
    return metrics


def network_input(case: torch.Tensor, inferer: Callable) -> torch.Tensor:
    """What the network itself receives when ``inferer`` runs on ``case``: a patch of the sliding window's
    ``roi_size`` (cropped or padded from the case), else the case. Used as the export example, so that networks
    exportable only for some sizes (MONAI ``UNet``) are captured at the size they will see."""
    roi_size = getattr(inferer, "roi_size", None)
    if roi_size is None:
        return case
    patch = ResizeWithPadOrCrop(roi_size)
    return torch.stack([torch.as_tensor(patch(sample)) for sample in case])


def evaluation_twin(evaluator: SupervisedEvaluator, network: nn.Module) -> SupervisedEvaluator:
    """A fresh CPU evaluator that evaluates ``network`` exactly as ``evaluator`` does (same data, batch
    preparation, inferer, decollation/post-processing and metrics) but without its other handlers, so checkpoint
    savers, loggers and energy meters attached to the original are not triggered by the extra runs."""
    metrics = _attached_metrics(evaluator)
    key = evaluator.state.key_metric_name
    if key not in metrics:
        raise ValueError(f"the evaluator has no key metric to compare fp32 and int8 with (attached metrics: {sorted(metrics)}).")
    twin = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=evaluator.data_loader,
        network=network,
        prepare_batch=evaluator.prepare_batch,
        inferer=evaluator.inferer,
        key_val_metric={key: metrics[key]},  # shared: Ignite resets a metric when an epoch of its engine starts
        decollate=False,  # the original's decollation and post-processing are copied below, in order
    )
    for handler, args, kwargs in evaluator._event_handlers.get(IterationEvents.MODEL_COMPLETED, []):
        twin.add_event_handler(IterationEvents.MODEL_COMPLETED, handler, *args[1:], **kwargs)  # args[0]: engine ref
    return twin


class PostTrainingQuantizationHandler:
    """
    Quantises the network to int8 when a run completes, and keeps the int8 model only if its metric holds up.

    Attached to a MONAI ``SupervisedTrainer`` (with ``evaluator`` = its validation evaluator) it runs at
    ``Events.COMPLETED`` on the best checkpoint (``checkpoint``, e.g. the ``key_metric_filename`` of a
    ``CheckpointSaver``); attached to an evaluator it quantises that evaluator's network. Then it:

    1. evaluates the fp32 network with a twin of the evaluator (same data, inferer, post-processing and key
       metric; see :func:`evaluation_twin`),
    2. calibrates static int8 quantisation (:func:`monai_qsa.quantization.quantize_ptq`) on
       ``calibration_loader`` (default: the evaluator's loader), passing the inputs through the evaluator's
       inferer so calibration sees what the network sees (sliding-window patches included),
    3. evaluates the int8 model with the same twin setup,
    4. measures parameters, FLOPs (multiply-accumulates), fp32 ``state_dict`` and int8 file sizes, and the median
       latency of one case through the inferer, fp32 vs int8, at the current thread count,
    5. writes ``output_dir/artifact_name`` (``save_quantized``) if the metric fell by at most ``max_metric_drop``
       (absolute; the key metric is taken as higher-is-better), and ``output_dir/report_name`` (JSON) in any case.

    A rejected int8 model is not saved under the deployable name, the log and the report say why, and the run
    still ends cleanly; so does a run whose int8 step fails (e.g. a network torch.export cannot capture): the error
    is logged with its traceback and written to the report, and the fp32 checkpoints stand. The figures also land in ``engine.state.metrics`` with ``prefix`` (default ``"int8_"``):
    ``int8_metric``, ``int8_fp32_metric``, ``int8_metric_drop``, ``int8_accepted`` (1/0), ``int8_size_ratio``,
    ``int8_latency_ratio`` (int8 / fp32) and ``int8_latency_ms``.

    Args:
        evaluator: the validation evaluator (required on a trainer; defaults to the engine on an evaluator).
        output_dir: folder for the artifact and report, created if missing.
        checkpoint: best-model checkpoint to quantise; if it does not exist when the run completes, the network
            as it is then is used and a warning says so.
        calibration_loader: batches to calibrate on (tensors or MONAI dict batches).
        num_calibration_batches: calibrate on at most this many batches (all by default).
        backend: ``"x86_inductor"`` (deployable file) or ``"x86_eager"`` (no file: torch.export cannot capture it).
        max_metric_drop: largest accepted fall of the key metric, fp32 minus int8.
        artifact_name: file name of the int8 model.
        report_name: file name of the JSON report.
        latency_repeats: timed runs per latency median.
        compile: time both models through :func:`monai_qsa.utils.compile.compile_for_cpu` (the deployed way;
            adds compilation time), or eagerly.
        metadata: extra entries stored in the artifact (e.g. labels).
        image_key: input key of dict batches.
        prefix: prefix of the names put into ``engine.state.metrics``.
        name: logger name; default ``PostTrainingQuantizationHandler``.
    """

    def __init__(
        self,
        evaluator: SupervisedEvaluator | None = None,
        output_dir: str | os.PathLike = "models",
        checkpoint: str | os.PathLike | None = None,
        calibration_loader: Iterable | None = None,
        num_calibration_batches: int | None = None,
        backend: str = "x86_inductor",
        max_metric_drop: float = 0.01,
        artifact_name: str = "model_int8.pt2",
        report_name: str = "quantization_report.json",
        latency_repeats: int = 10,
        compile: bool = True,
        metadata: dict | None = None,
        image_key: str = "image",
        prefix: str = "int8_",
        name: str | None = None,
    ) -> None:
        if max_metric_drop < 0:
            raise ValueError(f"max_metric_drop must be >= 0, got {max_metric_drop}.")
        self.evaluator = evaluator
        self.output_dir = Path(output_dir)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.calibration_loader = calibration_loader
        self.num_calibration_batches = num_calibration_batches
        self.backend = backend
        self.max_metric_drop = max_metric_drop
        self.artifact_name = artifact_name
        self.report_name = report_name
        self.latency_repeats = latency_repeats
        self.compile = compile
        self.metadata = metadata or {}
        self.image_key = image_key
        self.prefix = prefix
        self.logger = logging.getLogger(name or type(self).__name__)
        self.report: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Run at ``Events.COMPLETED`` of ``engine`` (a trainer with ``evaluator`` set, or an evaluator)."""
        if self.evaluator is None and not isinstance(engine, Evaluator):
            raise ValueError("PostTrainingQuantizationHandler on a trainer needs evaluator= (its validation evaluator).")
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Quantise, check and save; a failure of this optional last step is logged and reported, and the run
        (whose fp32 checkpoints are already written) still ends normally."""
        try:
            self._quantize_check_save(engine)
        except Exception as error:
            self.logger.exception("int8 quantisation failed; the fp32 model is unaffected")
            self.report = {"backend": self.backend, "accepted": False, "artifact": None, "error": f"{type(error).__name__}: {error}"}
            self._write_report(self.report)
            engine.state.metrics[self.prefix + "accepted"] = 0.0

    def _quantize_check_save(self, engine: Engine) -> None:
        evaluator = self.evaluator or engine
        network = self._fp32_network(engine)
        calibration = self.calibration_loader if self.calibration_loader is not None else evaluator.data_loader
        case = next(calibration_tensors(calibration, 1, self.image_key)).to("cpu")
        example = network_input(case, evaluator.inferer)
        self.logger.info(f"int8 quantisation ({self.backend}): calibrating on {self.num_calibration_batches or 'all'} batches")
        qmodel = quantize_ptq(
            network,
            calibration,
            example,
            backend=self.backend,
            num_batches=self.num_calibration_batches,
            image_key=self.image_key,
            inferer=evaluator.inferer,
        )
        fp32_runner = compile_for_cpu(network) if self.compile else network
        # torch.ao eager int8 modules (x86_eager) are run as they are: that backend is for machines without a compiler
        int8_runner = compile_for_cpu(qmodel, freezing=True) if self.compile and self.backend == "x86_inductor" else qmodel
        fp32_metric, int8_metric = self._evaluate(evaluator, fp32_runner), self._evaluate(evaluator, int8_runner)
        report = {
            "backend": self.backend,
            "key_metric": evaluator.state.key_metric_name,
            "fp32_metric": fp32_metric,
            "int8_metric": int8_metric,
            "metric_drop": fp32_metric - int8_metric,
            "max_metric_drop": self.max_metric_drop,
            "accepted": fp32_metric - int8_metric <= self.max_metric_drop,
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
            "input_shape": list(example.shape[1:]),
            "parameters": count_parameters(network),
            "flops": count_flops(network, example[:1]),
            "fp32_state_dict_bytes": serialized_size(network),
            "latency": self._latency(evaluator.inferer, case[:1], fp32_runner, int8_runner),
        }
        report.update(self._save(qmodel, example, report))
        self._write_report(report)
        self._publish(engine, report)
        self.report = report

    def _fp32_network(self, engine: Engine) -> nn.Module:
        """A CPU copy of the engine's network in eval mode, with the best checkpoint loaded when there is one."""
        network = engine.network.module if isinstance(engine.network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else engine.network
        network = copy.deepcopy(network).to("cpu").eval()
        if self.checkpoint is not None and self.checkpoint.is_file():
            load_network_weights(network, self.checkpoint)
        elif self.checkpoint is not None:
            self.logger.warning(f"checkpoint {self.checkpoint} does not exist; quantising the network as the run left it.")
        return network

    @staticmethod
    def _evaluate(evaluator: SupervisedEvaluator, network: nn.Module) -> float:
        twin = evaluation_twin(evaluator, network)
        twin.run()
        return float(twin.state.metrics[twin.state.key_metric_name])

    def _latency(self, inferer: Callable, case: torch.Tensor, fp32: nn.Module, int8: nn.Module) -> dict:
        """Median and individual latencies (ms) of one case through the evaluator's inferer."""
        runs = {}
        with torch.no_grad():
            for label, model in (("fp32", fp32), ("int8", int8)):
                warmup = 2 if self.compile else 1  # compiled: the first call compiles, the second may specialise
                seconds = repeated_seconds(lambda model=model: inferer(case, model), self.latency_repeats, warmup=warmup)
                runs[label] = [1000 * s for s in seconds]
        return {
            "fp32_ms": statistics.median(runs["fp32"]),
            "int8_ms": statistics.median(runs["int8"]),
            "ratio": statistics.median(runs["int8"]) / statistics.median(runs["fp32"]),
            "fp32_runs_ms": runs["fp32"],
            "int8_runs_ms": runs["int8"],
            "threads": torch.get_num_threads(),
            "fp32_mode": run_mode(fp32),
            "int8_mode": run_mode(int8),
            "per": "one case through the evaluator's inferer",
        }

    def _save(self, qmodel: nn.Module, example: torch.Tensor, report: dict) -> dict:
        """Write the int8 model: under the deployable name if accepted, as ``*.rejected*`` otherwise (for
        inspection); ``x86_eager`` models cannot be saved. Returns the report's artifact entries."""
        deployable = self.output_dir / self.artifact_name
        if report["accepted"]:
            target, reason = deployable, f"metric drop {report['metric_drop']:.4f} <= {self.max_metric_drop}"
        else:
            target = deployable.with_name(f"{deployable.stem}.rejected{deployable.suffix}")
            reason = f"metric drop {report['metric_drop']:.4f} > max_metric_drop {self.max_metric_drop}: not deployed"
            self.logger.warning(f"int8 model rejected: {reason} (fp32 {report['fp32_metric']:.4f}, int8 {report['int8_metric']:.4f}).")
            if deployable.exists():
                deployable.unlink()
                self.logger.warning(f"removed {deployable} from an earlier run: it does not match this run's network.")
        if self.backend != "x86_inductor":
            size = serialized_size(qmodel)
            return {"artifact": None, "reason": reason + f"; {self.backend} models cannot be saved", "int8_bytes": size, "size_ratio": size / report["fp32_state_dict_bytes"]}
        metadata = {"key_metric": report["key_metric"], "int8_metric": report["int8_metric"], "fp32_metric": report["fp32_metric"], **self.metadata}
        save_quantized(target, qmodel, example, metadata=metadata)
        size = serialized_size(target)
        self.logger.info(f"int8 model written to {target} ({size} bytes, {size / report['fp32_state_dict_bytes']:.2f}x fp32): {reason}")
        return {"artifact": str(target) if report["accepted"] else None, "rejected_artifact": None if report["accepted"] else str(target), "reason": reason, "int8_bytes": size, "size_ratio": size / report["fp32_state_dict_bytes"]}

    def _write_report(self, report: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / self.report_name
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, path)

    def _publish(self, engine: Engine, report: dict) -> None:
        values = {
            "metric": report["int8_metric"],
            "fp32_metric": report["fp32_metric"],
            "metric_drop": report["metric_drop"],
            "accepted": float(report["accepted"]),
            "size_ratio": report["size_ratio"],
            "latency_ms": report["latency"]["int8_ms"],
            "latency_ratio": report["latency"]["ratio"],
        }
        engine.state.metrics.update({self.prefix + key: value for key, value in values.items()})
        self.logger.info("int8 report: " + ", ".join(f"{self.prefix}{key}={value:.4g}" for key, value in values.items()))
