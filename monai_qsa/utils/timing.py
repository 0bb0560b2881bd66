"""Wall-clock timing of repeated calls, shared by the quantisation report, inference and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["repeated_seconds", "median_seconds"]


def repeated_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls (compilation, caches)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return statistics.median(repeated_seconds(fn, repeats, warmup))
