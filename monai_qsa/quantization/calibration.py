"""Calibration inputs for static quantisation: the tensors a network sees, from whatever the user's data yields."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["calibrate", "calibration_tensors", "reiterable"]


def calibration_tensors(
    calibration_data: Iterable, num_batches: int | None = None, image_key: str = "image"
) -> Iterator[torch.Tensor]:
    """Input tensors from an iterable of tensors, of ``(input, target)`` tuples, or of MONAI dict batches."""
    for batch in itertools.islice(calibration_data, num_batches):
        if isinstance(batch, dict):
            if image_key not in batch:
                raise ValueError(f"calibration batch has no '{image_key}' key (keys: {sorted(batch)}); set image_key.")
            batch = batch[image_key]
        elif isinstance(batch, (list, tuple)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"calibration data must yield tensors or dict batches, got {type(batch).__name__}.")
        yield batch.as_tensor() if hasattr(batch, "as_tensor") else batch


def reiterable(calibration_data: Iterable, num_batches: int | None) -> Iterable:
    """``calibration_data`` itself when it can be iterated again (a list, a ``DataLoader``), else its first
    ``num_batches`` items kept in a list, for calibrations that need several passes."""
    if not isinstance(calibration_data, Iterator):
        return calibration_data
    return list(itertools.islice(calibration_data, num_batches))


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], inferer: Callable | None = None) -> None:
    """Run ``model`` (through ``inferer(batch, model)`` if given) on every batch, without gradients.

    Raises:
        ValueError: ``batches`` is empty.
    """
    seen = 0
    with torch.no_grad():
        for batch in batches:
            inferer(batch, model) if inferer is not None else model(batch)
            seen += 1
    if seen == 0:
        raise ValueError("calibration_data yielded no batches: static quantisation needs real inputs to calibrate on.")
