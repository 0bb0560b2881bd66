"""Locked, append-only CSV rows: safe for several processes (distributed ranks) writing the same file."""

from __future__ import annotations

import csv
import fcntl
import io
import os
from pathlib import Path

__all__ = ["append_csv_row"]


def append_csv_row(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    """Append one row to a CSV under an exclusive lock, writing the header first if the file is new or empty.
    The row goes out in a single ``write`` so concurrent writers (e.g. distributed ranks) never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
