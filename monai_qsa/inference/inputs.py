"""What batch inference finds in an input folder, and where each image's output goes.

Every entry is accounted for: an image file to process, or an entry listed with the reason it is not one (hidden,
a sub-folder without ``--recursive``, pixel data of a detached header, a dangling symlink, a symlink loop, a folder
named like an image, a special file). Output names never collide: inputs that would share one get distinct names.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from monai_qsa.data.datalist import IMAGE_SUFFIXES

__all__ = ["InputEntry", "scan_inputs", "list_inputs", "case_stem", "output_path", "assign_outputs"]

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


def case_stem(path: Path) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_path(input_dir: Path, output_dir: Path, path: Path) -> Path:
    """``<output_dir>/<relative folder>/<name>_seg.nii.gz`` for input ``path``."""
    relative = path.relative_to(input_dir)
    return output_dir / relative.parent / f"{case_stem(path)}_seg.nii.gz"


def assign_outputs(files: list[Path], input_dir: Path, output_dir: Path) -> dict[Path, Path]:
    """The segmentation output of each input, distinct for every input.

    Inputs whose default outputs (:func:`output_path`) coincide, ignoring case (``case.nii`` and ``case.nii.gz``),
    are all named after their whole file name instead: ``case_nii_seg.nii.gz``, ``case_nii_gz_seg.nii.gz``.

    Raises:
        ValueError: some outputs still coincide (an input is itself named like another's renamed output); the
            message lists them.
    """
    targets = {path: output_path(input_dir, output_dir, path) for path in files}
    for group in _coinciding(targets).values():
        for path in group:
            targets[path] = targets[path].with_name(f"{path.name.replace('.', '_')}_seg.nii.gz")
    clashes = _coinciding(targets)
    if clashes:
        listed = "; ".join(" and ".join(str(p) for p in group) for group in clashes.values())
        raise ValueError(f"these inputs would write the same output, rename one of each group: {listed}")
    return targets


def _coinciding(targets: dict[Path, Path]) -> dict[str, list[Path]]:
    """Groups of inputs whose outputs are the same path, ignoring case (case-insensitive file systems)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, target in targets.items():
        groups[str(target).lower()].append(path)
    return {key: group for key, group in groups.items() if len(group) > 1}
