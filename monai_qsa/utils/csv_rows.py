"""Locked, append-only CSV rows: safe for several processes (distributed ranks) writing the same file, and for
files left behind by a killed writer or written by an earlier version with fewer columns."""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from monai_qsa.utils.files import atomic_write

__all__ = ["append_csv_row", "extend_csv_columns"]

logger = logging.getLogger(__name__)


def _is_current(path: Path, f: BinaryIO) -> bool:
    """Whether the open file ``f`` still is the file at ``path`` (not replaced or removed since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def _locked(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading and appending (created if missing) under an exclusive lock. If another process
    replaced the file while this one waited for the lock (:func:`extend_csv_columns`), the new file is opened."""
    while True:
        with open(path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            if _is_current(path, f):
                yield f
                return


def _line_break_after_cut(f: BinaryIO, path: Path) -> bytes:
    """What to write before a new row so it starts on its own line: nothing after a complete line; otherwise the
    last line was cut (a writer killed mid-row) and is kept as it is, with one warning."""
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    if last == b"\n":
        return b""
    if last == b"\r":  # cut between the two characters of the row terminator: the row itself is complete
        return b"\n"
    logger.warning(f"{path}: its last line is incomplete (a killed run?); it is kept, new rows start on the next line.")
    return b"\r\n"


def append_csv_row(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    """Append one row to a CSV under an exclusive lock, writing the header first if the file is new or empty.

    The row goes out in a single ``write`` so concurrent writers (e.g. distributed ranks) never interleave. If the
    file's last line is incomplete (its writer was killed), the row starts on a new line instead of being glued to
    it, and one warning names the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    with _locked(path) as f:
        if f.seek(0, os.SEEK_END) == 0:
            writer.writeheader()
            prefix = b""
        else:
            prefix = _line_break_after_cut(f, path)
        writer.writerow(row)
        f.write(prefix + buffer.getvalue().encode())
        f.flush()
        os.fsync(f.fileno())


def extend_csv_columns(path: Path, columns: tuple[str, ...]) -> None:
    """Make an existing CSV ready for rows with ``columns`` without losing any of its rows.

    A missing or empty file, or one whose header already is ``columns``, is left alone. A header that is a strict
    prefix of ``columns`` (written by an earlier version; columns are only ever added at the end) is completed:
    the file is replaced in one step by the same bytes under the full header, so its rows are kept unchanged, with
    the new columns empty (``None`` from :class:`csv.DictReader`), and one warning names the file and the added
    columns.

    Raises:
        ValueError: the header is neither, naming the file; the file is left untouched.
    """
    if not path.is_file():
        return
    with _locked(path) as f:
        f.seek(0)
        content = f.read()
        if not content:
            return
        header_line, _, rows = content.partition(b"\n")
        header = next(csv.reader([header_line.decode(errors="replace")]), [])
        if tuple(header) == columns:
            return
        if not header or tuple(header) != columns[: len(header)]:
            raise ValueError(
                f"CSV {path} exists with other columns {header}; expected {list(columns)}. "
                "Choose another file name or folder (the existing file is left untouched)."
            )
        header_buffer = io.StringIO()
        csv.writer(header_buffer).writerow(columns)
        # replaced while the lock is held: a writer waiting for it then finds a new file and opens that (_locked)
        with atomic_write(path) as completed:
            completed.write_bytes(header_buffer.getvalue().encode() + rows)
            os.chmod(completed, stat.S_IMODE(os.fstat(f.fileno()).st_mode))
    logger.warning(
        f"{path} has the columns of an earlier version: added {list(columns[len(header) :])} to its header; "
        "its rows are kept unchanged, with those columns empty."
    )
