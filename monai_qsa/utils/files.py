"""Writing files so that a killed process never leaves a truncated file under the final name."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "partial_files"]


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write to; it is renamed to ``target`` when the block ends
    without error, and removed otherwise. The parent folder is created if missing.

    The temporary name, ``.partial.<pid>.<random>.<name>``, is hidden, unique to the writing process (concurrent
    writers never share one) and keeps ``target``'s suffixes, for writers that choose the format from them
    (``.nii.gz``). One left behind by a killed process matches :func:`partial_files`.

    Example::

        with atomic_write("models/report.json") as partial:
            partial.write_text(text)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".partial.{os.getpid()}.{secrets.token_hex(4)}.{target.name}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def partial_files(target: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_write` for ``target`` (any process), e.g. left behind by a killed one.

    Only names of the exact form ``.partial.<pid>.<8 hex digits>.<name>`` match: the temporary file of another
    target whose name ends with ``target``'s (``ct.case1_seg.nii.gz`` for ``case1_seg.nii.gz``) does not.
    """
    target = Path(target)
    pattern = re.compile(r"\.partial\.\d+\.[0-9a-f]{8}\." + re.escape(target.name))
    candidates = target.parent.glob(f".partial.*.{glob.escape(target.name)}")
    return sorted(path for path in candidates if pattern.fullmatch(path.name))
