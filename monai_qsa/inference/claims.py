"""Claims on cases, so that concurrent ``infer`` runs into one output folder split the work.

A claim is a file ``<output>/.claims/<hash of the case>.claim`` holding an exclusive ``flock`` and, for people
looking, the host and process id of its holder. The kernel releases the lock when the holder ends in any way
(``kill -9`` included), so a claim left on disk by a killed run is simply taken by the next one: nothing stale ever
blocks a rerun. The holder removes the file when the case is done, and the last run removes the empty folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
from pathlib import Path

__all__ = ["CaseClaim", "CLAIMS_FOLDER", "ClaimsFolderError", "remove_claims_folder"]

CLAIMS_FOLDER = ".claims"


class ClaimsFolderError(OSError):
    """``<output>/.claims`` is unsafe to write in: a symlink, not a folder, or owned by another user."""


def _open_claims_folder(output_dir: Path) -> int:
    """A descriptor of ``<output>/.claims``, created (mode 0700) if missing. Claim files are opened relative to it,
    so a ``.claims`` swapped for a symlink after this check is never followed.

    Raises:
        ClaimsFolderError: it is a symlink, not a folder, or not owned by this process's user.
    """
    folder = output_dir / CLAIMS_FOLDER
    while True:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:  # another run just removed its empty one
            continue
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ClaimsFolderError(
                    f"{folder} is a symlink or not a folder: refused (claims are only written in a real folder of "
                    "this user); remove it and run again"
                ) from error
            raise
        owner = os.fstat(fd).st_uid
        if owner != os.getuid():
            os.close(fd)
            raise ClaimsFolderError(
                f"{folder} is owned by another user (uid {owner}, this process runs as uid {os.getuid()}): refused; "
                "remove it and run again"
            )
        return fd


class CaseClaim:
    """An exclusive claim on one case of an output folder.

    Args:
        output_dir: the run's output folder.
        key: what identifies the case in that folder (its output's relative path, or its input for classification).
    """

    def __init__(self, output_dir: Path, key: str) -> None:
        self.output_dir = output_dir
        self.name = f"{hashlib.sha1(key.encode()).hexdigest()}.claim"
        self.path = output_dir / CLAIMS_FOLDER / self.name
        self.key = key
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self, wait: bool) -> bool:
        """Take the claim; if another process holds it, wait for its release (``wait``) or return ``False``.

        The claim file is opened without following symlinks (``O_NOFOLLOW``) in a ``.claims`` folder checked by
        :func:`_open_claims_folder`, so a planted symlink never makes this process truncate another file.

        Raises:
            ClaimsFolderError: ``.claims`` is a symlink, not a folder, or owned by another user.
        """
        while True:
            dir_fd = _open_claims_folder(self.output_dir)
            try:
                fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            except FileNotFoundError:  # the folder was removed by another run since it was opened: open it anew
                os.close(dir_fd)
                continue
            except OSError as error:
                os.close(dir_fd)
                if error.errno == errno.ELOOP:
                    raise ClaimsFolderError(f"{self.path} is a symlink: refused") from error
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                os.close(dir_fd)
                return False
            if self._is_current(fd, dir_fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} pid {os.getpid()}: {self.key}\n".encode())
                self._fd, self._dir_fd = fd, dir_fd
                return True
            os.close(fd)  # the previous holder released and removed it while this process waited: claim anew
            os.close(dir_fd)

    def release(self) -> None:
        """Remove the claim file, then let go of the lock."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self._dir_fd)
            os.close(self._fd)
            os.close(self._dir_fd)
            self._fd = self._dir_fd = None

    def holder(self) -> str:
        """Who holds the claim, as written in its file (empty if unknown)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return ""
        with open(fd, "rb") as f:
            return f.read(4096).decode(errors="replace").strip()

    def _is_current(self, fd: int, dir_fd: int) -> bool:
        try:
            return os.stat(self.name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
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
