"""Calibration for static quantisation: the tensors a network sees, from whatever the user's data yields, and the one
pass that calibrates the int8 swaps of a converted program (attention, 3D convolutions)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["calibrate", "calibrate_swaps", "calibration_tensors", "reiterable"]


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


def calibrate_swaps(
    program: torch.fx.GraphModule,
    finishers: list[Callable[[bool], int] | None],
    calibration_data: Iterable,
    num_batches: int | None = None,
    image_key: str = "image",
    inferer: Callable | None = None,
) -> list[int]:
    """One calibration pass of ``program`` for the observers that ``observe_*`` functions (e.g.
    :func:`observe_attention`) inserted, then their ``finish`` (the swaps). On any error every observer is removed
    (nodes swapped by an earlier ``finish`` stay swapped) and the error is raised.

    Args:
        program: the graph module the observers were inserted in.
        finishers: the ``observe_*`` functions' results (None: nothing to observe).
        calibration_data: as for ``quantize_ptq``: tensors, ``(input, target)`` tuples or MONAI dict batches.
        num_batches: calibrate on at most this many batches (default: all).
        image_key: the input's key in dict batches.
        inferer: calibrate through ``inferer(batch, program)`` instead of ``program(batch)``.

    Returns:
        each finisher's number of swapped nodes (0 for None); no calibration runs when all are None.

    Raises:
        ValueError: no calibration batch, or a finisher's check of the observed ranges.
    """
    active = [finish for finish in finishers if finish is not None]
    done = 0
    try:
        if active:
            program.recompile()
            calibrate(program, calibration_tensors(calibration_data, num_batches, image_key), inferer)
        counts = {}
        for finish in active:
            done += 1  # a finisher removes its observers even when it raises
            counts[finish] = finish(True)
    except BaseException:
        for finish in active[done:]:
            finish(False)
        raise
    finally:
        program.recompile()
    return [counts.get(finish, 0) if finish is not None else 0 for finish in finishers]
