"""The built-in default datasets: deterministic synthetic images written as NIfTI in the Medical Segmentation
Decathlon layout, so every bundle runs offline on a fresh clone.

Segmentation (``seg2d``, ``seg3d``): bright ellipses/ellipsoids ("lesions") of random size and place on a smooth,
noisy background; the label is their mask. Classification (``cls``): one object per image of one of the
``CLASS_NAMES`` (a disc, a rounded square, a ring, a striped disc, a speckled disc); the label is its class index.
The classes differ only in shape detail and texture: every object draws its area, elongation, rotation, place,
edge blur, contrast and in-object shading from the same ranges, carries the same integrated intensity, and every
image gets a random intensity scale and shift, so global intensity statistics are near chance and the default
models land well below accuracy 1.0 (docs/data.md). Images carry anisotropic spacing, a flipped axis and an origin
(plus an oblique rotation in 3D), so pipelines must honour the affine.
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

CLASS_NAMES = ("disc", "square", "ring", "striped", "speckled")

# classification difficulty: ranges the generator draws from (object radius and edge width in pixels; ring hole,
# speckle size and wave periods in object radii; contrast and intensity shift relative to the background level)
_OBJECT_RADIUS = (8.0, 13.0)
_MAX_ASPECT = 1.15
_EDGE_WIDTH = (0.4, 1.0)
_SQUARE_EXPONENT = (6.0, 20.0)
_RING_HOLE = (0.25, 0.5)
_SPECKLES = (4, 7)
_SPECKLE_SIZE = 0.14
_SPECKLE_DEPTH = (0.6, 1.0)
_STRIPE_PERIOD = (0.35, 0.55)
_SHADING_PERIOD = (1.8, 3.0)
_WAVE_DEPTH = (0.3, 0.7)
_CONTRAST = (0.6, 1.0)
_INTENSITY_SCALE = (0.6, 1.6)
_INTENSITY_SHIFT = (-0.3, 0.3)


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
        (64, 64), (0.8, 0.8), (120, 30, 12), f"2D classification of one object per image: {', '.join(CLASS_NAMES)}"
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


def _soft_mask(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased, blurred occupancy in [0, 1] from a signed distance in pixels (positive inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip(signed_distance / edge, -30.0, 30.0)))


def _outline_distance(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed distance (in object radii, positive inside) to the outline of a ``name`` object of radius 1 at the
    origin of object coordinates ``u``, ``v``; the class detail is drawn from ``rng``."""
    radius = np.hypot(u, v)
    if name == "square":  # a superellipse: rounded corners, between a disc (exponent 2) and a square (infinity)
        exponent = rng.uniform(*_SQUARE_EXPONENT)
        return 1.0 - (np.abs(u) ** exponent + np.abs(v) ** exponent) ** (1.0 / exponent)
    if name == "ring":  # a concentric hole
        return np.minimum(1.0 - radius, radius - rng.uniform(*_RING_HOLE))
    return 1.0 - radius


def _texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative intensity pattern of a ``name`` object in object coordinates ``u``, ``v`` (object radii).

    Every object is shaded by a sine wave of the same depth range, so the spread of intensities inside an object
    does not tell classes apart; only ``striped`` has a short period (fine stripes), the others a period longer than
    the object (a smooth ramp).
    """
    period = rng.uniform(*(_STRIPE_PERIOD if name == "striped" else _SHADING_PERIOD))
    direction, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * (math.cos(direction) * u + math.sin(direction) * v) / period + phase)
    pattern = 1.0 + rng.uniform(*_WAVE_DEPTH) * wave
    if name == "speckled":  # a few small dark spots inside
        count = int(rng.integers(_SPECKLES[0], _SPECKLES[1] + 1))
        angles, radii = rng.uniform(0, 2 * math.pi, count), 0.65 * np.sqrt(rng.uniform(0, 1, count))
        spots = np.zeros_like(u)
        for angle, radius in zip(angles, radii):
            squared = (u - radius * math.cos(angle)) ** 2 + (v - radius * math.sin(angle)) ** 2
            spots = np.maximum(spots, np.exp(-squared / (2 * _SPECKLE_SIZE**2)))
        pattern = pattern * (1.0 - rng.uniform(*_SPECKLE_DEPTH) * spots)
    return pattern


def _classification_object(rng: np.random.Generator, shape: tuple[int, int], name: str) -> np.ndarray:
    """Intensity (mean 1 over its area) of one ``name`` object of random area, elongation, rotation, edge blur
    and place. Every class draws its area from the same range and carries the same integrated intensity, so
    neither size nor brightness tells classes apart."""
    target_area = math.pi * rng.uniform(*_OBJECT_RADIUS) ** 2
    aspect, angle, edge = rng.uniform(1.0, _MAX_ASPECT), rng.uniform(0.0, 2 * math.pi), rng.uniform(*_EDGE_WIDTH)
    extent = math.sqrt(target_area / math.pi) * 1.6
    cy, cx = (rng.uniform(extent + 2, n - extent - 2) for n in shape)
    y, x = np.meshgrid(np.arange(shape[0]) - cy, np.arange(shape[1]) - cx, indexing="ij")
    u = (math.cos(angle) * y + math.sin(angle) * x) / math.sqrt(aspect)
    v = (-math.sin(angle) * y + math.cos(angle) * x) * math.sqrt(aspect)
    detail_seed = int(rng.integers(2**31))

    def occupancy(radius: float) -> np.ndarray:
        distance = _outline_distance(name, u / radius, v / radius, np.random.default_rng(detail_seed))
        return _soft_mask(distance * radius, edge)

    radius = math.sqrt(target_area / math.pi)
    radius *= math.sqrt(target_area / occupancy(radius).sum())  # corrects for the ring's hole, the square's corners
    intensity = occupancy(radius) * _texture(name, u / radius, v / radius, rng)
    return intensity * (target_area / intensity.sum())


def _classification_case(rng: np.random.Generator, shape: tuple[int, int], kind: int) -> np.ndarray:
    """Noisy, shaded background plus one object of class ``CLASS_NAMES[kind]`` at a random contrast, then a random
    intensity scale and shift of the whole image (as between scanners)."""
    background = _background(rng, shape)
    image = background + rng.uniform(*_CONTRAST) * _classification_object(rng, shape, CLASS_NAMES[kind])
    image = rng.uniform(*_INTENSITY_SCALE) * image + rng.uniform(*_INTENSITY_SHIFT)
    return (1000 * image).astype(np.float32)


def _balanced_classes(rng: np.random.Generator, count: int) -> list[int]:
    """``count`` class indices in random order, each class appearing ``count // len(CLASS_NAMES)`` or one more
    times."""
    return [int(k) for k in rng.permutation(np.arange(count) % len(CLASS_NAMES))]


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
        kinds = _balanced_classes(rng, count) if task == "cls" else []
        for index in range(count):
            name = f"{task}_{split[:3]}_{index:03d}.nii.gz"
            folder = "imagesTs" if split == "test" else "imagesTr"
            if task == "cls":
                kind = kinds[index]
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
