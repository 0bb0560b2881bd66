"""The built-in synthetic classification dataset (``cls``): deterministic, balanced, in Decathlon layout, and hard
in the intended way: global intensity statistics do not tell its classes apart, spatial structure does."""

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_qsa.data import make_synthetic_dataset
from monai_qsa.data.synthetic import CLASS_NAMES

CHANCE = 1 / len(CLASS_NAMES)


def _read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``split`` scaled between their 0.5th and 99.5th percentiles as the sa_cls bundle scales them,
    and their class indices."""
    cases = json.loads((root / "dataset.json").read_text())[split]
    images = np.stack([nib.load(root / case["image"]).get_fdata() for case in cases])
    low, high = (np.percentile(images, q, axis=(1, 2), keepdims=True) for q in (0.5, 99.5))
    return np.clip((images - low) / (high - low), 0, 1), np.array([case["label"] for case in cases])


def _intensity_statistics(images: np.ndarray) -> np.ndarray:
    """Per image: mean, standard deviation, 5th/50th/95th/99th percentiles and skewness of all pixels."""
    flat = images.reshape(len(images), -1)
    centred = flat - flat.mean(1, keepdims=True)
    skewness = (centred**3).mean(1) / flat.std(1) ** 3
    return np.column_stack([flat.mean(1), flat.std(1), *np.percentile(flat, [5, 50, 95, 99], axis=1), skewness])


def _radial_spectrum(images: np.ndarray) -> np.ndarray:
    """Per image: log power of the spatial frequencies averaged over rings of equal frequency (invariant to the
    object's place and rotation)."""
    size = images.shape[-1]
    power = np.abs(np.fft.fft2(images - images.mean((1, 2), keepdims=True))) ** 2
    frequency = np.fft.fftfreq(size)
    rings = np.minimum((np.hypot(frequency[:, None], frequency[None]) * size).astype(int), size // 2).ravel()
    sums = np.stack([np.bincount(rings, p.ravel(), size // 2 + 1) for p in power])
    return np.log(sums[:, 1:] / np.bincount(rings, minlength=size // 2 + 1)[1:])


def _nearest_centroid_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, labels: np.ndarray):
    """Accuracy on ``test`` of a nearest-centroid classifier fitted on standardised ``train`` features."""
    mean, std = train.mean(0), train.std(0) + 1e-12
    train, test = (train - mean) / std, (test - mean) / std
    centroids = np.stack([train[train_labels == k].mean(0) for k in range(len(CLASS_NAMES))])
    predicted = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == labels).mean())


@pytest.fixture(scope="module")
def large_cls(tmp_path_factory):
    """250 training and 250 validation images: enough for class statistics to be stable."""
    root = tmp_path_factory.mktemp("cls") / "data"
    make_synthetic_dataset("cls", root, seed=0, num_cases=(250, 250, 0))
    return _read(root, "training"), _read(root, "validation")


def test_same_seed_same_files_other_seed_other_images(tmp_path):
    first, second, _ = (
        make_synthetic_dataset("cls", tmp_path / name, seed=seed, num_cases=(10, 5, 2))
        for name, seed in (("a", 4), ("b", 4), ("c", 5))
    )
    assert first.read_text() == second.read_text()
    for relative in ("imagesTr/cls_tra_003.nii.gz", "imagesTr/cls_val_001.nii.gz", "imagesTs/cls_tes_001.nii.gz"):
        np.testing.assert_array_equal(
            nib.load(tmp_path / "a" / relative).get_fdata(), nib.load(tmp_path / "b" / relative).get_fdata()
        )
    assert not np.allclose(
        nib.load(tmp_path / "a/imagesTr/cls_tra_003.nii.gz").get_fdata(),
        nib.load(tmp_path / "c/imagesTr/cls_tra_003.nii.gz").get_fdata(),
    )


def test_classes_are_balanced_in_every_split(tmp_path):
    description = json.loads(make_synthetic_dataset("cls", tmp_path / "d", num_cases=(23, 11, 0)).read_text())
    assert description["labels"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert 4 <= len(CLASS_NAMES) <= 6
    for split, count in (("training", 23), ("validation", 11)):
        counts = Counter(case["label"] for case in description[split])
        assert sum(counts.values()) == count and set(counts) <= set(range(len(CLASS_NAMES)))
        assert max(counts.values()) - min(counts.get(k, 0) for k in range(len(CLASS_NAMES))) <= 1
    labels = [case["label"] for case in description["training"]]
    assert labels != sorted(labels)  # shuffled, not in class order


def test_default_dataset_is_in_decathlon_layout_with_an_anisotropic_flipped_affine(tmp_path):
    path = make_synthetic_dataset("cls", tmp_path / "d")
    description = json.loads(path.read_text())
    assert (len(description["training"]), len(description["validation"]), len(description["test"])) == (120, 30, 12)
    assert description["numTraining"] == 120 and description["numTest"] == 12
    assert all(case["image"].startswith("./imagesTr/") for case in description["training"] + description["validation"])
    assert all(image.startswith("./imagesTs/") for image in description["test"])
    assert not any((tmp_path / "d/labelsTr").iterdir())  # class indices live in dataset.json
    image = nib.load(tmp_path / "d" / description["test"][0])
    assert image.shape == (64, 64) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.diag(image.affine)[:2], [-0.8, 0.8])
    assert np.any(image.affine[:3, 3] != 0)


def test_global_intensity_statistics_do_not_separate_the_classes(large_cls):
    (train, train_labels), (test, labels) = large_cls
    accuracy = _nearest_centroid_accuracy(
        _intensity_statistics(train), train_labels, _intensity_statistics(test), labels
    )
    assert accuracy < CHANCE + 0.15, f"intensity statistics alone classify {accuracy:.2f} of the images"


def test_spatial_structure_separates_the_classes_well_above_chance(large_cls):
    (train, train_labels), (test, labels) = large_cls
    accuracy = _nearest_centroid_accuracy(_radial_spectrum(train), train_labels, _radial_spectrum(test), labels)
    assert accuracy > CHANCE + 0.25, f"the radial power spectrum classifies only {accuracy:.2f} of the images"
