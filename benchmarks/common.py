"""Helpers shared by the benchmark scripts: medians of repeated timings and peak memory of one call."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

from monai_qsa.utils.timing import median_seconds

__all__ = ["median_seconds", "peak_memory_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


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

