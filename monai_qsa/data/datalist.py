"""Decathlon-style dataset folders: load ``dataset.json``, check it against the files before any training starts,
and fall back to the built-in synthetic dataset when the folder does not exist."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib

from monai_qsa.data.synthetic import TASKS, make_synthetic_dataset

__all__ = ["IMAGE_SUFFIXES", "prepare_dataset", "load_datalist", "image_shape", "folder_datalist"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
#: share of ``training`` used for validation when ``dataset.json`` has no ``validation`` list
VALIDATION_FRACTION = 0.2

logger = logging.getLogger(__name__)


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Array shape of an image file, read from its header only (nibabel for NIfTI, SimpleITK for ITK formats)."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return tuple(nib.load(path).shape)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    components = reader.GetNumberOfComponents()
    return tuple(size) + ((components,) if components > 1 else ())


def _resolve(dataset_dir: Path, entry: str, json_path: Path) -> str:
    path = (dataset_dir / entry).resolve()
    if not str(path).lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{json_path}: {entry} is not an image file this project reads ({', '.join(IMAGE_SUFFIXES)}).")
    if not path.is_file():
        raise FileNotFoundError(f"{json_path} lists {entry}, but {path} does not exist.")
    return str(path)


def _check_classification_label(label, num_classes: int, image: str, json_path: Path) -> None:
    if isinstance(label, bool) or not isinstance(label, (int, list)):
        raise ValueError(f"{json_path}: label of {image} must be a class index or a 0/1 list, got {label!r}.")
    if isinstance(label, int) and not 0 <= label < num_classes:
        raise ValueError(f"{json_path}: label {label} of {image} is not a class index in [0, {num_classes}).")
    if isinstance(label, list) and (len(label) != num_classes or any(v not in (0, 1) for v in label)):
        raise ValueError(f"{json_path}: multi-label target of {image} must be {num_classes} values of 0/1, got {label!r}.")


def load_datalist(dataset_dir: str | os.PathLike, task: str) -> dict:
    """Read and check ``dataset_dir/dataset.json``.

    Every listed file must exist and be an image; segmentation labels must have their image's shape;
    classification labels must be class indices (multi-class) or 0/1 lists with one value per class (multi-label).
    Errors name the offending file.

    Args:
        dataset_dir: folder holding ``dataset.json``; paths in it are relative to the folder.
        task: ``"seg2d"``, ``"seg3d"`` or ``"cls"``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "labels": {index: name}, "multi_label": bool}``
        with absolute paths; ``test`` items are ``{"image": path}``. Without a ``validation`` list the last 20 %
        of ``training`` is used.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}.")
    root = Path(dataset_dir).resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"dataset_dir {root} exists but has no dataset.json (Decathlon layout expected).")
    try:
        description = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(description, dict) or not description.get("training"):
        raise ValueError(f"{json_path} has no 'training' list of cases.")
    labels = {int(k): v for k, v in description.get("labels", {}).items()}
    training = list(description["training"])
    validation = list(description.get("validation") or [])
    if not validation:
        split = max(1, round(len(training) * VALIDATION_FRACTION))
        if split >= len(training):
            raise ValueError(f"{json_path} needs a 'validation' list or at least 2 training cases.")
        training, validation = training[:-split], training[-split:]
        logger.info(f"{json_path} has no validation list: using the last {split} training cases.")

    multi_label = False
    checked: dict[str, list] = {"training": [], "validation": []}
    for split, items in (("training", training), ("validation", validation)):
        for item in items:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ValueError(f"{json_path}: each {split} case needs 'image' and 'label', got {item!r}.")
            image = _resolve(root, item["image"], json_path)
            if task == "cls":
                _check_classification_label(item["label"], len(labels), item["image"], json_path)
                multi_label = multi_label or isinstance(item["label"], list)
                checked[split].append({"image": image, "label": item["label"]})
                continue
            label = _resolve(root, item["label"], json_path)
            if image_shape(image)[: len(image_shape(label))] != image_shape(label):
                raise ValueError(f"label {label} has shape {image_shape(label)} but its image {image} has shape {image_shape(image)}.")
            checked[split].append({"image": image, "label": label})
    test = [{"image": _resolve(root, t if isinstance(t, str) else t["image"], json_path)} for t in description.get("test", [])]
    if task == "cls" and len(labels) < 2:
        raise ValueError(f"{json_path}: classification needs 'labels' naming at least 2 classes.")
    return {**checked, "test": test, "labels": labels, "multi_label": multi_label}


def prepare_dataset(dataset_dir: str | os.PathLike, task: str, seed: int = 0) -> dict:
    """The bundles' data entry point: if ``dataset_dir`` does not exist, write the built-in synthetic dataset there
    (:func:`make_synthetic_dataset`); then load and check it with :func:`load_datalist`."""
    if not Path(dataset_dir).exists():
        logger.info(f"dataset_dir {dataset_dir} does not exist: writing the built-in synthetic {task} dataset there.")
        make_synthetic_dataset(task, dataset_dir, seed=seed)
    return load_datalist(dataset_dir, task)


def folder_datalist(input_dir: str | os.PathLike, recursive: bool = False) -> list[dict]:
    """``[{"image": path}, ...]`` for the image files (:data:`IMAGE_SUFFIXES`) in ``input_dir``, sorted.

    Raises:
        FileNotFoundError / ValueError: the folder does not exist, or holds no image file.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist.")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"input folder {root} holds no image file ({', '.join(IMAGE_SUFFIXES)}).")
    return [{"image": str(p.resolve())} for p in files]
