"""Ignite handler that quantises the trained network to int8 at the end of a run: a thin adapter over
:func:`monai_qsa.quantization.check.quantize_and_check`."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_qsa.models import load_checkpoint
from monai_qsa.quantization.check import (
    QuantizationFailedError,
    QuantizationReport,
    higher_is_better,
    quantize_and_check,
    twin_evaluation,
    weights_fingerprint,
    withdraw_artifact,
)

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.metrics import Metric
    from monai.engines import Evaluator, SupervisedEvaluator
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    Evaluator, _ = optional_import("monai.engines", name="Evaluator")
    SupervisedEvaluator, _ = optional_import("monai.engines", name="SupervisedEvaluator")

__all__ = ["PostTrainingQuantizationHandler"]


def _unwrapped(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


class PostTrainingQuantizationHandler:
    """
    Quantises the network to int8 when a run completes and keeps the int8 model only if its metric holds up:
    :func:`~monai_qsa.quantization.check.quantize_and_check` with the run's own evaluation.

    Attached to a MONAI ``SupervisedTrainer`` (with ``evaluator`` = its validation evaluator) it runs at
    ``Events.COMPLETED`` on the best checkpoint (``checkpoint``, e.g. the ``key_metric_filename`` of a
    ``CheckpointSaver``); attached to (or called with) an evaluator it quantises that evaluator's network. The
    metric is evaluated by a twin of the evaluator (same data, batch preparation and inferer, with ``key_metric``
    and ``postprocessing``: give the evaluator's own) and compared in the direction of its ``metric_cmp_fn``. The
    fp32 metric is not evaluated again when the evaluator already validated exactly these weights.

    A rejected int8 model is not saved under the deployable name (a stale one is removed), the log and the report
    say why, and the run still ends cleanly; so does a run whose int8 step fails: the error is logged and written to
    the report (if the report cannot be written, e.g. ``output_dir`` is not a writable folder, the log says so), no
    deployable int8 file is left, and the fp32 checkpoints stand. The figures land in ``engine.state.metrics`` with
    ``prefix``: ``int8_metric``, ``int8_fp32_metric``, ``int8_metric_drop``, ``int8_accepted`` (1/0),
    ``int8_size_ratio``, and, when latency is timed, ``int8_latency_ms`` and ``int8_latency_ratio`` (int8 / fp32).

    Args:
        evaluator: the validation evaluator (required on a trainer; defaults to the engine on an evaluator).
        key_metric: the evaluator's key metric, ``{name: Metric}`` (in bundles ``@validate#key_metric``).
        postprocessing: the evaluator's postprocessing (in bundles ``@validate#postprocessing``).
        output_dir: folder for the artifact and report, created if missing.
        checkpoint: best-model checkpoint to quantise; if it does not exist when the run completes, the network
            as it is then is used and a warning says so.
        calibration_loader: batches to calibrate on (default: the evaluator's loader).
        max_calibration_patches: calibrate on at most this many network inputs (sliding-window patches spread
            over the cases, or images); None: all.
        num_calibration_batches: read at most this many batches of the calibration loader.
        backend: ``"x86_inductor"`` (deployable file) or ``"x86_eager"`` (no file).
        int8_conv3d: compute 3D convolutions in int8 (``quantize_ptq``); set where measured faster, as in sa_seg3d.
        max_metric_drop: largest accepted worsening of the key metric, int8 vs fp32.
        artifact_name: file name of the int8 model.
        report_name: file name of the JSON report.
        latency_repeats: timed runs of one network input per latency median; 0 turns timing off.
        compile: time the latency through ``compile_for_cpu`` (the deployed way) rather than eagerly (the metrics
            are evaluated eagerly either way).
        metadata: extra entries stored in the artifact (e.g. labels).
        image_key: input key of dict batches.
        prefix: prefix of the names put into ``engine.state.metrics``.
        name: logger name; default ``PostTrainingQuantizationHandler``.
    """

    def __init__(
        self,
        evaluator: SupervisedEvaluator | None = None,
        key_metric: dict[str, Metric] | None = None,
        postprocessing: Callable | None = None,
        output_dir: str | os.PathLike = "models",
        checkpoint: str | os.PathLike | None = None,
        calibration_loader: Iterable | None = None,
        max_calibration_patches: int | None = 32,
        num_calibration_batches: int | None = None,
        backend: str = "x86_inductor",
        int8_conv3d: bool = False,
        max_metric_drop: float = 0.01,
        artifact_name: str = "model_int8.pt2",
        report_name: str = "quantization_report.json",
        latency_repeats: int = 3,
        compile: bool = True,
        metadata: dict | None = None,
        image_key: str = "image",
        prefix: str = "int8_",
        name: str | None = None,
    ) -> None:
        if not key_metric:
            raise ValueError("PostTrainingQuantizationHandler needs key_metric= (the evaluator's key_val_metric).")
        if max_metric_drop < 0:
            raise ValueError(f"max_metric_drop must be >= 0, got {max_metric_drop}.")
        self.evaluator, self.key_metric, self.postprocessing = evaluator, key_metric, postprocessing
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.calibration_loader, self.prefix = calibration_loader, prefix
        self.options = dict(
            output_dir=output_dir, checkpoint=checkpoint, backend=backend, int8_conv3d=int8_conv3d,
            max_metric_drop=max_metric_drop,
            max_calibration_patches=max_calibration_patches, num_calibration_batches=num_calibration_batches,
            latency_repeats=latency_repeats, compile=compile, artifact_name=artifact_name, report_name=report_name,
            metadata=metadata, image_key=image_key,
        )  # fmt: skip
        self.logger = logging.getLogger(name or type(self).__name__)
        self.validated: dict[str, tuple[float, int]] = {}  # weights fingerprint -> (key metric, epoch)
        self.report: QuantizationReport | None = None

    def attach(self, engine: Engine) -> None:
        """Run at ``Events.COMPLETED`` of ``engine`` (a trainer with ``evaluator`` set, or an evaluator), and note
        the evaluator's validations, whose fp32 metric is then reused for the same weights."""
        if self.evaluator is None and not isinstance(engine, Evaluator):
            raise ValueError(
                "PostTrainingQuantizationHandler on a trainer needs evaluator= (its validation evaluator)."
            )
        evaluator = self.evaluator or engine
        if not evaluator.has_event_handler(self.record_validation, Events.EPOCH_COMPLETED):
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.record_validation)
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def record_validation(self, evaluator: Evaluator) -> None:
        """Remember the evaluator's key metric for the weights it was computed with."""
        if evaluator.state.key_metric_name == next(iter(self.key_metric)):
            metric = evaluator.state.metrics.get(evaluator.state.key_metric_name)
            if isinstance(metric, (int, float)):
                self.validated[weights_fingerprint(_unwrapped(evaluator.network))] = (
                    float(metric),
                    evaluator.state.epoch,
                )

    def __call__(self, engine: Engine) -> None:
        """Quantise, check and save; a failure of this optional last step is logged and reported, and the run
        (whose fp32 checkpoints are already written) still ends normally."""
        evaluator = self.evaluator or engine
        try:
            network = self._fp32_network(evaluator)
            fp32_metric, epoch = self.validated.get(weights_fingerprint(network), (None, None))
            self.report = quantize_and_check(
                network,
                twin_evaluation(evaluator, self.key_metric, self.postprocessing),
                self.calibration_loader if self.calibration_loader is not None else evaluator.data_loader,
                inferer=evaluator.inferer,
                key_metric=next(iter(self.key_metric)),
                metric_higher_is_better=higher_is_better(evaluator.metric_cmp_fn),
                fp32_metric=fp32_metric,
                fp32_metric_source=f"validation at epoch {epoch}",
                **self.options,
            )
        except QuantizationFailedError as error:
            self.logger.exception("int8 quantisation failed; the fp32 model is unaffected")
            self.report = error.report
        except Exception as error:  # before quantisation began: the checkpoint or the evaluator setup
            self.logger.exception("int8 quantisation could not start; the fp32 model is unaffected")
            self.report = QuantizationReport(self.options["backend"], error=f"{type(error).__name__}: {error}")
            self._report_failure(self.report, error)
        self._publish(engine, self.report)

    def _report_failure(self, report: QuantizationReport, cause: Exception) -> None:
        """For a step that could not start: remove a deployable file of an earlier run (it does not hold this run's
        network) and write the report; a failure of either (e.g. an unwritable ``output_dir``) is logged next to
        ``cause``, the step's own error, and the run goes on."""
        output_dir = Path(self.options["output_dir"])
        deployable, path = output_dir / self.options["artifact_name"], output_dir / self.options["report_name"]
        try:
            withdraw_artifact(report, deployable, "this run's int8 step could not start")
        except OSError as remove_error:
            report.error += f"; {deployable} could not be removed ({type(remove_error).__name__}: {remove_error})"
            self.logger.error(f"{deployable} could not be removed ({remove_error}): do not deploy it.")
        try:
            report.write(path)
        except Exception as write_error:
            self.logger.error(
                f"int8 quantisation report {path} could not be written ({type(write_error).__name__}: {write_error}); "
                f"the step had failed with {type(cause).__name__}: {cause}"
            )

    def _fp32_network(self, evaluator: Evaluator) -> nn.Module:
        """A CPU copy of the evaluator's network in eval mode, with the best checkpoint loaded when there is one."""
        network = copy.deepcopy(_unwrapped(evaluator.network)).to("cpu").eval()
        if self.checkpoint is not None and self.checkpoint.is_file():
            return load_checkpoint(network, self.checkpoint)
        if self.checkpoint is not None:
            self.logger.warning(
                f"checkpoint {self.checkpoint} does not exist; quantising the network as the run left it."
            )
        return network

    def _publish(self, engine: Engine, report: QuantizationReport) -> None:
        values = {"accepted": float(report.accepted)}
        if report.error is None:
            values |= {
                "metric": report.int8_metric,
                "fp32_metric": report.fp32_metric,
                "metric_drop": report.metric_drop,
                "size_ratio": report.size_ratio,
            }
        if report.latency is not None:
            values |= {"latency_ms": report.latency["int8_ms"], "latency_ratio": report.latency["ratio"]}
        engine.state.metrics.update({self.prefix + key: value for key, value in values.items()})
        self.logger.info(
            "int8 report: " + ", ".join(f"{self.prefix}{key}={value:.4g}" for key, value in values.items())
        )
