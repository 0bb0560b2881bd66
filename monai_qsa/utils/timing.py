"""Wall-clock timing of repeated calls and peak memory of one call, shared by the quantisation report, inference
and the benchmark scripts."""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

__all__ = ["in_turn", "median_seconds", "peak_memory_bytes", "repeated_seconds"]


def repeated_seconds(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Time of each of ``repeats`` calls of ``fn()`` on ``clock`` (wall time by default; ``time.thread_time`` for
    the calling thread's CPU time), after ``warmup`` untimed calls (compilation, caches)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def in_turn(measure: Callable[[str], T], names: Sequence[str], rounds: int) -> dict[str, list[T]]:
    """``measure(name)`` of each of ``names``, one after another, round after round: changes in the machine's speed
    (other jobs, a shared VM's neighbours) then reach every name alike, which measurements minutes apart cannot
    promise. The order turns by one place each round, so that each name runs first (after the previous round's
    last) as often as the others, not always in the same place.

    Returns:
        the results of each name, in round order.
    """
    names = list(names)
    if rounds < 1 or not names:
        raise ValueError(f"in_turn needs names and at least 1 round, got {len(names)} names and {rounds} rounds.")
    results: dict[str, list[T]] = {name: [] for name in names}
    for turn in range(rounds):
        first = turn % len(names)
        for name in names[first:] + names[:first]:
            results[name].append(measure(name))
    return results


def median_seconds(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time of ``fn()`` on ``clock`` over ``repeats`` calls after ``warmup`` calls (see
    :func:`repeated_seconds`)."""
    return statistics.median(repeated_seconds(fn, repeats, warmup, clock))


def _rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(fn: Callable[[], object], interval_s: float = 0.0005) -> int:
    """Peak growth of the resident set while ``fn()`` runs, sampled every ``interval_s`` seconds.

    Freed heap is first returned to the OS (``malloc_trim``) so the baseline holds only live data; the
    figure is therefore the extra memory one call needs (inputs and weights excluded).
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - baseline
