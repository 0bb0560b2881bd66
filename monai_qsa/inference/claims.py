"""Claims on cases, so that concurrent ``infer`` runs into one output folder split the work.

A claim is a file ``<output>/.claims/<hash of the case>.claim`` holding an exclusive ``flock`` and, for people
looking, the host and process id of its holder. The kernel releases the lock when the holder ends in any way
(``kill -9`` included), so a claim left on disk by a killed run is simply taken by the next one: nothing stale ever
blocks a rerun. The holder removes the file when the case is done, and the last run removes the empty folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from pathlib import Path

__all__ = ["CaseClaim", "CLAIMS_FOLDER", "remove_claims_folder"]

CLAIMS_FOLDER = ".claims"


class CaseClaim:
    """An exclusive claim on one case of an output folder.

    Args:
        output_dir: the run's output folder.
        key: what identifies the case in that folder (its output's relative path, or its input for classification).
    """

    def __init__(self, output_dir: Path, key: str) -> None:
        self.path = output_dir / CLAIMS_FOLDER / f"{hashlib.sha1(key.encode()).hexdigest()}.claim"
        self.key = key
        self._fd: int | None = None

    def acquire(self, wait: bool) -> bool:
        """Take the claim; if another process holds it, wait for its release (``wait``) or return ``False``."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # no claims folder yet, or another run just removed its empty one
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            if self._is_current(fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} pid {os.getpid()}: {self.key}\n".encode())
                self._fd = fd
                return True
            os.close(fd)  # the previous holder released and removed it while this process waited: claim anew

    def release(self) -> None:
        """Remove the claim file, then let go of the lock."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """Who holds the claim, as written in its file (empty if unknown)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __enter__(self) -> CaseClaim:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def remove_claims_folder(output_dir: Path) -> None:
    """Remove the claims folder of ``output_dir`` if no claim is left in it (a concurrent run may still use it)."""
    with contextlib.suppress(OSError):
        (output_dir / CLAIMS_FOLDER).rmdir()
