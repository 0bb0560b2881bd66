"""The built-in default datasets: deterministic synthetic images written as NIfTI in the Medical Segmentation
Decathlon layout, so every bundle runs offline on a fresh clone.

Segmentation (``seg2d``, ``seg3d``): bright ellipses/ellipsoids ("lesions") of random size and place on a smooth,
noisy background; the label is their mask. Classification (``cls``): one shape per image, a disc, a square or a
ring; the label is its class index. Images carry anisotropic spacing, a flipped axis and an origin (plus an oblique
rotation in 3D), so pipelines must honour the affine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["SYNTHETIC_TASKS", "CLASS_NAMES", "make_synthetic_dataset"]

CLASS_NAMES = ("disc", "square", "ring")


@dataclass(frozen=True)
class _TaskSpec:
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    splits: tuple[int, int, int]  # training, validation, test cases
    description: str


SYNTHETIC_TASKS = {
    "seg2d": _TaskSpec((96, 112), (0.9, 1.2), (64, 16, 8), "2D segmentation of bright elliptical lesions"),
    "seg3d": _TaskSpec((48, 48, 40), (1.2, 1.2, 1.6), (24, 6, 4), "3D segmentation of bright ellipsoidal lesions"),
    "cls": _TaskSpec(
        (64, 64), (0.8, 0.8), (120, 30, 12), f"2D classification of one shape per image: {', '.join(CLASS_NAMES)}"
    ),
}


def _affine(spacing: tuple[float, ...], rotation_deg: float) -> np.ndarray:
    """A 4x4 affine with the given voxel spacing, the first axis flipped, a rotation about the last axis (3D) and
    a non-zero origin."""
    affine = np.eye(4)
    angle = math.radians(rotation_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    scale = np.diag(list(spacing) + [1.0] * (3 - len(spacing)))
    scale[0, 0] *= -1
    affine[:3, :3] = rotation @ scale
    affine[:3, 3] = [40.0, -25.0, 10.0]
    return affine


def _background(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth intensity ramp plus Gaussian noise."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ramp = sum(rng.uniform(-0.15, 0.15) * g for g in grids)
    return 0.2 + ramp + rng.normal(0, 0.12, shape)


def _ellipsoid(rng: np.random.Generator, shape: tuple[int, ...], radius_range: tuple[float, float]) -> np.ndarray:
    radii = rng.uniform(*radius_range, size=len(shape))
    centre = [rng.uniform(r + 2, n - r - 2) for r, n in zip(radii, shape)]
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def _segmentation_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        label |= _ellipsoid(rng, shape, (4.0, min(shape) / 6))
    image = _background(rng, shape) + label * rng.uniform(0.6, 0.9)
    return (1000 * image).astype(np.float32), label.astype(np.uint8)


def _shape_mask(rng: np.random.Generator, shape: tuple[int, int], kind: int) -> np.ndarray:
    size = rng.uniform(9, 16)
    cy, cx = (rng.uniform(size + 3, n - size - 3) for n in shape)
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    distance = np.hypot(y - cy, x - cx)
    if kind == 0:
        return distance <= size
    if kind == 1:
        return (np.abs(y - cy) <= size * 0.85) & (np.abs(x - cx) <= size * 0.85)
    return (distance <= size) & (distance >= size * 0.55)


def _classification_case(rng: np.random.Generator, shape: tuple[int, int], kind: int) -> np.ndarray:
    image = _background(rng, shape) + _shape_mask(rng, shape, kind) * rng.uniform(0.6, 0.9)
    return (1000 * image).astype(np.float32)


def make_synthetic_dataset(
    task: str, root_dir: str | os.PathLike, seed: int = 0, num_cases: tuple[int, int, int] | None = None
) -> Path:
    """Write the built-in synthetic dataset of ``task`` under ``root_dir`` in Decathlon layout.

    ``root_dir/dataset.json`` lists ``training`` and ``validation`` (image and label) and ``test`` (image only)
    cases; images are in ``imagesTr``/``imagesTs``, segmentation labels in ``labelsTr``, classification labels
    (class indices) in the JSON. The same ``seed`` gives the same files. Existing files are never overwritten:
    ``root_dir`` must not exist or be empty.

    Args:
        task: ``"seg2d"``, ``"seg3d"`` or ``"cls"``.
        root_dir: folder to create.
        seed: random seed of the images.
        num_cases: (training, validation, test) case counts; defaults per task (seg2d 64/16/8, seg3d 24/6/4,
            cls 120/30/12).

    Returns:
        the path of ``dataset.json``.

    Example::

        make_synthetic_dataset("seg3d", "data/synthetic_seg3d", num_cases=(4, 2, 1))
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {sorted(SYNTHETIC_TASKS)}, got {task!r}.")
    spec = SYNTHETIC_TASKS[task]
    root = Path(root_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and is not empty; the synthetic dataset is only written into a new folder."
        )
    counts = spec.splits if num_cases is None else tuple(num_cases)
    if len(counts) != 3 or min(counts) < 0 or counts[0] < 1:
        raise ValueError(f"num_cases must be (training >= 1, validation >= 0, test >= 0), got {num_cases}.")
    rng = np.random.default_rng(seed)
    affine = _affine(spec.spacing, rotation_deg=12.0 if len(spec.shape) == 3 else 0.0)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def save(array: np.ndarray, relative: str) -> str:
        nib.save(nib.Nifti1Image(array, affine), root / relative)
        return f"./{relative}"

    cases: dict[str, list] = {"training": [], "validation": [], "test": []}
    for split, count in zip(cases, counts):
        for index in range(count):
            name = f"{task}_{split[:3]}_{index:03d}.nii.gz"
            folder = "imagesTs" if split == "test" else "imagesTr"
            if task == "cls":
                kind = int(rng.integers(len(CLASS_NAMES)))
                entry = {"image": save(_classification_case(rng, spec.shape, kind), f"{folder}/{name}"), "label": kind}
            else:
                image, label = _segmentation_case(rng, spec.shape)
                entry = {"image": save(image, f"{folder}/{name}")}
                if split != "test":
                    entry["label"] = save(label, f"labelsTr/{name}")
            cases[split].append(entry["image"] if split == "test" else entry)
    labels = dict(enumerate(CLASS_NAMES)) if task == "cls" else {0: "background", 1: "lesion"}
    description = {
        "name": f"monai_qsa synthetic {task}",
        "description": spec.description + f" (monai_qsa built-in dataset, seed {seed})",
        "tensorImageSize": f"{len(spec.shape)}D",
        "modality": {"0": "synthetic"},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": counts[0],
        "numTest": counts[2],
        **cases,
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(description, indent=2))
    return path
