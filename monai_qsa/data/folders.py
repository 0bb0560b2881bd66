"""What an image folder holds: every entry accounted for, either an image file or an entry listed with the
reason it is not one (hidden, a sub-folder when not recursive, pixel data of a detached header, a dangling symlink,
a symlink loop, a folder named like an image, a special file). Batch inference and the bundles' ``input_dir``
datalists list folders through this module."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "InputEntry", "scan_inputs", "list_inputs", "folder_datalist"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
"""File name endings of the image formats this project reads."""

logger = logging.getLogger(__name__)

IGNORED, FAILED = "ignored", "failed"


@dataclass(frozen=True)
class InputEntry:
    """One entry under the input folder: a file to process (``status`` empty) or one that is not, with why.

    Attributes:
        path: the entry as found under the input folder (symlinks not resolved).
        status: ``""`` (a file to process), ``"ignored"`` (not an input by design) or ``"failed"`` (meant as an
            input but unusable).
        reason: why the entry is not processed.
    """

    path: Path
    status: str = ""
    reason: str = ""


def _looks_like_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_detached_data(path: Path) -> bool:
    """Pixel data of a detached-header image (``x.raw`` of ``x.mhd`` / ``x.nhdr``): read through its header."""
    return path.name.lower().endswith((".raw", ".zraw", ".raw.gz")) and any(
        path.with_name(path.name.split(".")[0] + header).is_file() for header in (".mhd", ".nhdr")
    )


def _classify(path: Path, recursive: bool, visited: set[tuple[int, int]]) -> tuple[InputEntry | None, bool]:
    """The entry for ``path`` (``None`` for a folder that is only walked into) and whether to walk into it."""
    if path.name.startswith("."):
        return InputEntry(path, IGNORED, "hidden entry (name starts with '.')"), False
    try:
        info = path.stat()
    except OSError as error:
        if path.is_symlink():
            if error.errno == errno.ELOOP:
                return InputEntry(path, FAILED, "symlink loop: the link resolves to itself"), False
            return InputEntry(path, FAILED, f"dangling symlink: its target {os.readlink(path)} does not exist"), False
        return InputEntry(path, FAILED, f"cannot read entry: {error.strerror}"), False
    if stat.S_ISDIR(info.st_mode):
        if (info.st_dev, info.st_ino) in visited:
            return InputEntry(path, FAILED, "symlink loop: this folder was already visited"), False
        if _looks_like_image(path.name):
            return InputEntry(path, FAILED, "a folder named like an image, not an image file"), recursive
        if not recursive:
            return InputEntry(path, IGNORED, "sub-folder (use --recursive to process it)"), False
        return None, True
    if not stat.S_ISREG(info.st_mode):
        return InputEntry(path, FAILED, "not a regular file (a device, pipe or socket)"), False
    if _is_detached_data(path):
        return InputEntry(path, IGNORED, "pixel data of a detached header (read through the header)"), False
    return InputEntry(path), False


def _scan(folder: Path, recursive: bool, visited: set[tuple[int, int]], entries: list[InputEntry]) -> None:
    info = folder.stat()
    visited.add((info.st_dev, info.st_ino))
    try:
        children = sorted(folder.iterdir())
    except OSError as error:
        entries.append(InputEntry(folder, FAILED, f"cannot list the folder: {error.strerror}"))
        return
    for child in children:
        entry, walk_into = _classify(child, recursive, visited)
        if entry is not None:
            entries.append(entry)
        if walk_into:
            _scan(child, recursive, visited, entries)


def scan_inputs(input_dir: Path, recursive: bool) -> list[InputEntry]:
    """Every entry of ``input_dir`` (and, if ``recursive``, of its sub-folders, symlinked ones followed once),
    sorted by path."""
    entries: list[InputEntry] = []
    _scan(input_dir, recursive, set(), entries)
    return sorted(entries, key=lambda entry: entry.path)


def list_inputs(input_dir: Path, recursive: bool) -> list[Path]:
    """The files of ``input_dir`` to process (supported or not: unsupported ones are reported by the caller)."""
    return [entry.path for entry in scan_inputs(input_dir, recursive) if not entry.status]


def folder_datalist(input_dir: str | os.PathLike, recursive: bool = False) -> list[dict]:
    """``[{"image": path}, ...]`` for the image files (:data:`IMAGE_SUFFIXES`) in ``input_dir``, sorted (a bundle's
    ``input_dir`` datalist); every other entry is logged once with the reason it is skipped.

    Raises:
        FileNotFoundError / ValueError: the folder does not exist, or holds no image file.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist.")
    files, skipped = [], []
    for entry in scan_inputs(root, recursive):
        if entry.status:
            skipped.append(f"{entry.path.name} ({entry.reason})")
        elif not _looks_like_image(entry.path.name):
            skipped.append(f"{entry.path.name} (not an image file: {', '.join(IMAGE_SUFFIXES)})")
        else:
            files.append(entry.path)
    if skipped:
        logger.warning("input folder %s: skipping %s", root, "; ".join(skipped))
    if not files:
        raise ValueError(f"input folder {root} holds no image file ({', '.join(IMAGE_SUFFIXES)}).")
    return [{"image": str(p.resolve())} for p in files]
