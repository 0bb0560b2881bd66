"""Decathlon-style dataset folders: load ``dataset.json``, check it against the files before any training starts,
and fall back to the built-in synthetic dataset when the folder does not exist."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_qsa.data.folders import IMAGE_SUFFIXES
from monai_qsa.data.headers import read_image_header
from monai_qsa.data.synthetic import SYNTHETIC_TASKS, make_synthetic_dataset
from monai_qsa.utils.cache import cache_dir
from monai_qsa.utils.files import atomic_write

__all__ = ["prepare_dataset", "load_datalist", "label_values"]

#: share of ``training`` used for validation when ``dataset.json`` has no ``validation`` list
VALIDATION_FRACTION = 0.2
#: offending values and files quoted in one error message
_MAX_QUOTED = 10

logger = logging.getLogger(__name__)


def _read_array(path: str) -> np.ndarray:
    """Voxel values of an image file (NIfTI scaling applied), without converting integer data to float."""
    if path.lower().endswith((".nii", ".nii.gz")):
        return np.asanyarray(nib.load(path).dataobj)
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def label_values(path: str | os.PathLike) -> dict[str, list]:
    """The distinct values of a label image, in one pass over its voxels.

    Returns:
        ``{"values": [sorted distinct integers]}``, or ``{"non_integer": [up to 10 of its non-integer values]}``
        when a voxel holds a fraction, NaN or infinity (a label map must hold class indices).
    """
    array = _read_array(str(path))
    if np.issubdtype(array.dtype, np.floating):
        fractional = ~(np.isfinite(array) & (array == np.round(array)))
        if fractional.any():
            return {"non_integer": np.unique(array[fractional])[:_MAX_QUOTED].tolist()}
    return {"values": np.unique(array).astype(np.int64).tolist()}


def _label_cache_file(dataset_dir: Path) -> Path:
    """Where the label values of ``dataset_dir`` are cached: ``$MONAI_QSA_CACHE_DIR/label_values/`` (default
    ``~/.cache/monai_qsa``), never inside the dataset folder, which may be read-only or shared."""
    cache_root = cache_dir()
    return cache_root / "label_values" / f"{hashlib.sha256(str(dataset_dir).encode()).hexdigest()[:16]}.json"


def _read_cache(cache_file: Path) -> dict:
    try:
        entries = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: scan again
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(cache_file: Path, entries: dict) -> None:
    """Replace the cache in one step (concurrent ranks never see half a file); an unwritable cache folder means
    no cache, not an error."""
    try:
        with atomic_write(cache_file) as partial:  # a failed write leaves no temporary file behind
            partial.write_text(json.dumps(entries))
    except OSError as error:
        logger.debug(f"label value cache {cache_file} not written ({error}): labels will be scanned again next time.")


def _file_key(path: str) -> dict[str, int]:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_summary(entry: object, key: dict[str, int]) -> dict[str, list] | None:
    """The summary of a cache entry if it was made from the file as it is now (same size and mtime), else None."""
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in key.items()):
        return None
    summary = entry.get("summary")
    valid = isinstance(summary, dict) and any(isinstance(summary.get(k), list) for k in ("values", "non_integer"))
    return summary if valid else None


def _read_label_values(path: str) -> dict[str, list]:
    try:
        return label_values(path)
    except Exception as error:  # nibabel/ITK/gzip errors often do not name the file
        raise ValueError(f"label {path} cannot be read: {type(error).__name__}: {error}") from error


def _cached_label_values(paths: Sequence[str], cache_file: Path) -> dict[str, dict[str, list]]:
    """:func:`label_values` of each path, reusing the cached result of files whose size and mtime are unchanged."""
    cached = _read_cache(cache_file)
    keys = {path: _file_key(path) for path in paths}
    results = {path: _cached_summary(cached.get(path), key) for path, key in keys.items()}
    stale = [path for path, summary in results.items() if summary is None]
    if stale:
        logger.info(
            f"checking the values of {len(stale)} label file(s) (read once, then cached in {cache_file.parent})"
        )
    results.update({path: _read_label_values(path) for path in stale})
    _write_cache(cache_file, {path: keys[path] | {"summary": results[path]} for path in paths})
    return results


def _check_label_values(paths: Sequence[str], num_classes: int, dataset_dir: Path, json_path: Path) -> None:
    """Every voxel of every segmentation label must be a class index in ``[0, num_classes)``.

    Raises:
        ValueError: naming each offending file and its values (non-integer, negative or ``>= num_classes``).
    """
    problems = []
    for path, summary in _cached_label_values(paths, _label_cache_file(dataset_dir)).items():
        if "non_integer" in summary:
            problems.append(f"{path}: non-integer values {summary['non_integer']}")
            continue
        outside = [v for v in summary["values"] if not 0 <= v < num_classes]
        if outside:
            problems.append(f"{path}: values {outside[:_MAX_QUOTED]}")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_QUOTED} more files" if len(problems) > _MAX_QUOTED else ""
        raise ValueError(
            f"{json_path}: {len(problems)} label file(s) hold values that are not class indices in [0, {num_classes}) "
            f"({num_classes} classes):\n  " + "\n  ".join(problems[:_MAX_QUOTED]) + more
        )


def _climbs_out(entry: str) -> bool:
    """Whether a relative ``dataset.json`` entry leaves the dataset folder through ``..``. Judged on the text, so
    a symbolic link inside the folder that points elsewhere is not flagged; absolute entries are not flagged."""
    return not os.path.isabs(entry) and os.path.normpath(entry).split(os.sep)[0] == os.pardir


class _EntryResolver:
    """Turns ``dataset.json`` entries into checked absolute paths, remembering the relative ones that climb out of
    the dataset folder."""

    def __init__(self, dataset_dir: Path, json_path: Path) -> None:
        self.dataset_dir = dataset_dir
        self.json_path = json_path
        self.outside: list[str] = []

    def __call__(self, entry: str) -> str:
        if not isinstance(entry, str):
            raise ValueError(f"{self.json_path}: file entries must be path strings, got {entry!r}.")
        if _climbs_out(entry):
            self.outside.append(entry)
        path = (self.dataset_dir / entry).resolve()
        if not str(path).lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(
                f"{self.json_path}: {entry} is not an image file this project reads ({', '.join(IMAGE_SUFFIXES)})."
            )
        if not path.is_file():
            raise FileNotFoundError(f"{self.json_path} lists {entry}, but {path} does not exist.")
        return str(path)

    def warn_outside(self) -> None:
        """One warning naming every relative entry that leaves the dataset folder."""
        if self.outside:
            quoted = ", ".join(self.outside[:_MAX_QUOTED]) + (" ..." if len(self.outside) > _MAX_QUOTED else "")
            warnings.warn(
                f"{self.json_path}: {len(self.outside)} relative path(s) climb out of {self.dataset_dir} through '..' "
                f"and are used as given: {quoted}. Write absolute paths for files kept elsewhere.",
                stacklevel=3,
            )


def _check_classification_label(label, num_classes: int, image: str, json_path: Path) -> None:
    if isinstance(label, bool) or not isinstance(label, (int, list)):
        raise ValueError(f"{json_path}: label of {image} must be a class index or a 0/1 list, got {label!r}.")
    if isinstance(label, int) and not 0 <= label < num_classes:
        raise ValueError(f"{json_path}: label {label} of {image} is not a class index in [0, {num_classes}).")
    if isinstance(label, list) and (len(label) != num_classes or any(v not in (0, 1) for v in label)):
        raise ValueError(
            f"{json_path}: multi-label target of {image} must be {num_classes} values of 0/1, got {label!r}."
        )


def _read_description(json_path: Path) -> dict:
    if not json_path.is_file():
        raise FileNotFoundError(
            f"dataset_dir {json_path.parent} exists but has no dataset.json (Decathlon layout expected)."
        )
    try:
        description = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(description, dict) or not description.get("training"):
        raise ValueError(f"{json_path} has no 'training' list of cases.")
    return description


def _read_labels(description: dict, json_path: Path) -> dict[int, str]:
    """``labels`` of ``dataset.json`` as ``{class index: name}`` (Decathlon writes ``{"0": "background", ...}``)."""
    labels = description.get("labels", {})
    try:
        return {int(index): name for index, name in labels.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(
            f'{json_path}: \'labels\' must map class indices to names, e.g. {{"0": "background", "1": "lesion"}}, '
            f"got {labels!r}."
        ) from None


def _number_of_classes(labels: dict[int, str], num_classes: int | None, task: str, json_path: Path) -> int:
    """The number of classes: ``num_classes`` (the network's outputs) if given, checked against the ``labels`` of
    ``dataset.json``, else the number of those ``labels``."""
    if num_classes is not None and labels and len(labels) != num_classes:
        raise ValueError(
            f"{json_path} names {len(labels)} classes in 'labels', but the network has num_classes={num_classes}."
        )
    classes = num_classes if num_classes is not None else len(labels)
    if task == "cls" and classes < 2:
        raise ValueError(f"{json_path}: classification needs 'labels' naming at least 2 classes.")
    if classes < 1:
        raise ValueError(
            f'{json_path} has no \'labels\' naming the classes (e.g. {{"0": "background", "1": "lesion"}}).'
        )
    return classes


def _split(description: dict, json_path: Path) -> tuple[list, list]:
    training = list(description["training"])
    validation = list(description.get("validation") or [])
    if not validation:
        split = max(1, round(len(training) * VALIDATION_FRACTION))
        if split >= len(training):
            raise ValueError(f"{json_path} needs a 'validation' list or at least 2 training cases.")
        training, validation = training[:-split], training[-split:]
        logger.info(f"{json_path} has no validation list: using the last {split} training cases.")
    return training, validation


def load_datalist(dataset_dir: str | os.PathLike, task: str, num_classes: int | None = None) -> dict:
    """Read and check ``dataset_dir/dataset.json``.

    Every listed file must exist and be an image; segmentation labels must have their image's shape and hold only
    class indices in ``[0, num_classes)`` (every voxel is read once; the distinct values are cached by path, size
    and modification time under ``$MONAI_QSA_CACHE_DIR/label_values``, so later runs read headers only);
    classification labels must be class indices (multi-class) or 0/1 lists with one value per class
    (multi-label). Errors name the offending file.

    Paths in ``dataset.json`` are relative to ``dataset_dir``, or absolute (accepted as they are: that is how
    files kept elsewhere are listed deliberately). A relative path that climbs out of ``dataset_dir`` through
    ``..`` is also accepted, as MONAI's ``load_decathlon_datalist`` does (datasets sharing an image folder use
    it), but with one warning naming all such entries: an accidental ``..`` would otherwise silently train on
    another dataset's files.

    Args:
        dataset_dir: folder holding ``dataset.json``.
        task: ``"seg2d"``, ``"seg3d"`` or ``"cls"``.
        num_classes: number of classes the network predicts (its output channels). Defaults to the number of
            ``labels`` in ``dataset.json``; when both are given they must agree.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "labels": {index: name}, "multi_label": bool}``
        with absolute paths; ``test`` items are ``{"image": path}``. Without a ``validation`` list the last 20 %
        of ``training`` is used.

    Raises:
        FileNotFoundError: no ``dataset.json``, or a listed file is missing.
        ValueError: malformed ``dataset.json``, a label of the wrong shape, or label values that are not class
            indices, naming the file and the values.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {sorted(SYNTHETIC_TASKS)}, got {task!r}.")
    root = Path(dataset_dir).resolve()
    json_path = root / "dataset.json"
    description = _read_description(json_path)
    labels = _read_labels(description, json_path)
    classes = _number_of_classes(labels, num_classes, task, json_path)
    training, validation = _split(description, json_path)
    resolve = _EntryResolver(root, json_path)

    multi_label = False
    checked: dict[str, list] = {"training": [], "validation": []}
    for split, items in (("training", training), ("validation", validation)):
        for item in items:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ValueError(f"{json_path}: each {split} case needs 'image' and 'label', got {item!r}.")
            image = resolve(item["image"])
            if task == "cls":
                _check_classification_label(item["label"], classes, item["image"], json_path)
                multi_label = multi_label or isinstance(item["label"], list)
                checked[split].append({"image": image, "label": item["label"]})
                continue
            label = resolve(item["label"])
            image_size, label_size = read_image_header(image).shape, read_image_header(label).shape
            if image_size[: len(label_size)] != label_size:
                raise ValueError(f"label {label} has shape {label_size} but its image {image} has shape {image_size}.")
            checked[split].append({"image": image, "label": label})
    test = [{"image": resolve(t if isinstance(t, str) else t["image"])} for t in description.get("test", [])]
    resolve.warn_outside()
    if task != "cls":
        _check_label_values([case["label"] for split in checked.values() for case in split], classes, root, json_path)
    return {**checked, "test": test, "labels": labels, "multi_label": multi_label}


def prepare_dataset(dataset_dir: str | os.PathLike, task: str, seed: int = 0, num_classes: int | None = None) -> dict:
    """The bundles' data entry point: if ``dataset_dir`` does not exist, write the built-in synthetic dataset there
    (:func:`make_synthetic_dataset`); then load and check it with :func:`load_datalist` (``num_classes`` is passed
    on)."""
    if not Path(dataset_dir).exists():
        logger.info(f"dataset_dir {dataset_dir} does not exist: writing the built-in synthetic {task} dataset there.")
        make_synthetic_dataset(task, dataset_dir, seed=seed)
    return load_datalist(dataset_dir, task, num_classes=num_classes)
