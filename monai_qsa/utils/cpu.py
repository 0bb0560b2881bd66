"""What the CPU is: model name and instruction-set flags, read once from ``/proc/cpuinfo``.

Used to key compiled kernels by the machine they were built for and to describe the machine in benchmark reports.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpu_flags", "cpu_model", "cpu_signature"]


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:  # not Linux, or /proc hidden
        return ()


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where ``/proc/cpuinfo`` is not available)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (``avx2``, ``avx512_vnni``, ...); empty if unknown."""
    line = next((line for line in _cpuinfo_lines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[1].split()) if line else frozenset()


def cpu_signature() -> str:
    """Architecture, model and flags: everything ``-march=native`` depends on, for keying compiled artifacts."""
    return f"{platform.machine()}|{cpu_model()}|{' '.join(sorted(cpu_flags()))}"
