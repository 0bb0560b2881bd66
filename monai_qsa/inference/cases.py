"""One failure policy for every command that works through a folder case by case (``infer``, ``explain``): a bad
file becomes a ``failed`` record with its reason and the run goes on; only whole-run errors (the output folder, the
bundle, the probabilities file) stop it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monai_qsa.data.folders import IMAGE_SUFFIXES, InputEntry
from monai_qsa.inference.bundle_runner import CaseError

__all__ = [
    "CaseRecord",
    "OutputFolderError",
    "BundleLoadError",
    "ProbabilitiesFileError",
    "RUN_ERRORS",
    "case_record",
]

logger = logging.getLogger(__name__)


class OutputFolderError(OSError):
    """The output folder cannot be written (read-only, no space left, no permission): the run stops."""


class BundleLoadError(ValueError):
    """The bundle's inference pipeline or model cannot be loaded."""


class ProbabilitiesFileError(ValueError):
    """``probabilities.csv`` in the output folder is not one this bundle's rows can be appended to."""


RUN_ERRORS = (OutputFolderError, BundleLoadError, ProbabilitiesFileError)
"""Errors that stop a whole run rather than fail one file."""


@dataclass
class CaseRecord:
    """One line of the run summary."""

    file: str
    status: str  # ok, skipped, failed, ignored
    reason: str = ""  # why it failed, was skipped or ignored; for ok, a note on the input (empty if none)
    output: str = ""
    latency_s: float | str = ""
    energy_j: float | str = ""
    energy_method: str = ""


def case_record(entry: InputEntry, process: Callable[[Path], CaseRecord | None]) -> CaseRecord | None:
    """The record of one input entry: entries that are not inputs (hidden, sub-folders, ...) and files of an
    unsupported format as they are, files through ``process``; a per-file failure (:class:`CaseError`, or an
    unexpected error, logged with its traceback) becomes a ``failed`` record, whole-run errors (:data:`RUN_ERRORS`)
    propagate.

    Args:
        entry: an entry of the input folder (:func:`monai_qsa.data.folders.scan_inputs`).
        process: work on one file; returns its record (``None``: not settled now, e.g. claimed by another run).
    """
    path = entry.path
    if entry.status:
        return CaseRecord(str(path), entry.status, entry.reason)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        return CaseRecord(str(path), "failed", f"unsupported extension (reads {', '.join(IMAGE_SUFFIXES)})")
    try:
        return process(path)
    except RUN_ERRORS:
        raise
    except CaseError as error:
        return CaseRecord(str(path), "failed", str(error))
    except Exception as error:  # a bug on one file must not stop the batch
        logger.exception(f"{path}: unexpected failure")
        return CaseRecord(str(path), "failed", f"{type(error).__name__}: {error}")
