"""Where each image of a batch-inference run writes its output: output names never collide, inputs that would
share one get distinct names. What the input folder holds comes from :mod:`monai_qsa.data.folders`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from monai_qsa.data.folders import IMAGE_SUFFIXES

__all__ = ["case_stem", "output_path", "assign_outputs"]


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
