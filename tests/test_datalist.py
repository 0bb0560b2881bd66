import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigParser

from monai_qsa.data import load_datalist, make_synthetic_dataset, prepare_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def seg_data(tmp_path, cache_dir):
    root = tmp_path / "data"
    make_synthetic_dataset("seg2d", root, num_cases=(3, 1, 1))
    return root


def _cases(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _overwrite_label(root: Path, index: int, value: float, dtype=np.uint8) -> Path:
    """Put ``value`` into a few voxels of the label of training case ``index``, keeping its shape and affine."""
    path = root / _cases(root)["training"][index]["label"]
    label = nib.load(path)
    array = np.asanyarray(label.dataobj).astype(dtype)
    array[:2, :2] = value
    nib.save(nib.Nifti1Image(array, label.affine), path)
    return path


def test_label_values_outside_the_classes_stop_loading_naming_files_and_values(seg_data):
    assert len(load_datalist(seg_data, "seg2d")["training"]) == 3
    seven, far = _overwrite_label(seg_data, 0, 7), _overwrite_label(seg_data, 1, 255)
    with pytest.raises(ValueError, match=r"2 label file\(s\).*\[0, 2\)") as error:
        load_datalist(seg_data, "seg2d")
    message = str(error.value)
    assert f"{seven}: values [7]" in message and f"{far}: values [255]" in message
    assert str(seg_data / "dataset.json") in message


def test_bundle_config_stops_before_training_on_a_bad_label(seg_data, tmp_path):
    bad = _overwrite_label(seg_data, 2, 7)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles/sa_seg/configs/train.json"))
    parser["dataset_dir"], parser["bundle_root"] = str(seg_data), str(tmp_path / "bundle")
    with pytest.raises(RuntimeError, match="prepare_dataset") as error:
        parser.get_parsed_content("train_datalist")
    assert isinstance(error.value.__cause__, ValueError) and f"{bad}: values [7]" in str(error.value.__cause__)


def test_non_integer_label_values_are_an_error(seg_data):
    bad = _overwrite_label(seg_data, 1, 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match=f"{bad.name}: non-integer values \\[0.5\\]"):
        load_datalist(seg_data, "seg2d")


def test_truncated_label_is_named(seg_data):
    path = seg_data / _cases(seg_data)["validation"][0]["label"]
    path.write_bytes(path.read_bytes()[:200])  # header intact, voxel data cut (an interrupted copy)
    with pytest.raises(ValueError, match=f"label {path} cannot be read"):
        load_datalist(seg_data, "seg2d")


def test_itk_label_values_are_checked(seg_data):
    description = _cases(seg_data)
    image = seg_data / description["training"][0]["image"]
    array = np.zeros(nib.load(image).shape[::-1], np.uint8)  # ITK arrays are (y, x)
    array[3, 4] = 3
    sitk.WriteImage(sitk.GetImageFromArray(array), str(seg_data / "labelsTr" / "case0.nrrd"))
    description["training"][0]["label"] = "labelsTr/case0.nrrd"
    (seg_data / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="case0.nrrd: values \\[3\\]"):
        load_datalist(seg_data, "seg2d")


def test_label_values_are_cached_by_path_size_and_mtime(seg_data, cache_dir):
    before = sorted(p.relative_to(seg_data) for p in seg_data.rglob("*"))
    load_datalist(seg_data, "seg2d")
    assert sorted(p.relative_to(seg_data) for p in seg_data.rglob("*")) == before  # nothing written into the dataset
    (cache_file,) = (cache_dir / "label_values").iterdir()
    entries = json.loads(cache_file.read_text())
    assert len(entries) == 4 and all(e["summary"] == {"values": [0, 1]} for e in entries.values())

    # an unchanged file is not read again: a (forged) cached summary is what gets checked
    first = next(iter(entries))
    entries[first]["summary"] = {"values": [0, 9]}
    cache_file.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=f"{Path(first).name}: values \\[9\\]"):
        load_datalist(seg_data, "seg2d")

    # a changed file is read again
    cache_file.write_text(json.dumps({k: v | {"summary": {"values": [0, 1]}} for k, v in entries.items()}))
    changed = _overwrite_label(seg_data, 2, 5)
    with pytest.raises(ValueError, match=f"{changed.name}: values \\[5\\]"):
        load_datalist(seg_data, "seg2d")


def test_unwritable_or_damaged_cache_means_no_cache(seg_data, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(blocker))
    assert len(load_datalist(seg_data, "seg2d")["validation"]) == 1
    damaged = tmp_path / "damaged"
    monkeypatch.setenv("MONAI_QSA_CACHE_DIR", str(damaged))
    load_datalist(seg_data, "seg2d")
    (cache_file,) = (damaged / "label_values").iterdir()
    cache_file.write_text("{cut")
    _overwrite_label(seg_data, 0, 4)
    with pytest.raises(ValueError, match="values \\[4\\]"):
        load_datalist(seg_data, "seg2d")


def test_failed_cache_write_leaves_no_temporary_file(seg_data, cache_dir):
    load_datalist(seg_data, "seg2d")
    (cache_file,) = (cache_dir / "label_values").iterdir()
    cache_file.unlink()
    cache_file.mkdir()  # the cache cannot be replaced: its write fails after the data was written
    assert len(load_datalist(seg_data, "seg2d")["validation"]) == 1
    assert list((cache_dir / "label_values").iterdir()) == [cache_file]


def test_num_classes_is_checked_against_dataset_labels(seg_data):
    with pytest.raises(ValueError, match="names 2 classes in 'labels', but the network has num_classes=3"):
        prepare_dataset(seg_data, "seg2d", num_classes=3)
    description = _cases(seg_data)
    (seg_data / "dataset.json").write_text(json.dumps(description | {"labels": {"background": 0, "lesion": 1}}))
    with pytest.raises(ValueError, match="'labels' must map class indices to names"):
        load_datalist(seg_data, "seg2d")
    del description["labels"]
    (seg_data / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="has no 'labels' naming the classes"):
        load_datalist(seg_data, "seg2d")
    _overwrite_label(seg_data, 0, 2)
    assert len(load_datalist(seg_data, "seg2d", num_classes=3)["training"]) == 3
    with pytest.raises(ValueError, match="values \\[2\\]"):
        load_datalist(seg_data, "seg2d", num_classes=2)


def test_relative_paths_leaving_dataset_dir_warn_once_absolute_paths_do_not(seg_data, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    description = _cases(seg_data)
    moved = []
    for case in description["training"][:2]:
        source = seg_data / case["image"]
        shutil.move(source, shared / source.name)
        case["image"] = f"../shared/{source.name}"
        moved.append(case["image"])
    (seg_data / "dataset.json").write_text(json.dumps(description))
    with pytest.warns(UserWarning) as caught:
        data = load_datalist(seg_data, "seg2d")
    assert len(caught) == 1 and all(entry in str(caught[0].message) for entry in moved)
    assert "climb out of" in str(caught[0].message) and data["training"][0]["image"] == str(
        shared / Path(moved[0]).name
    )

    for case in description["training"][:2]:
        case["image"] = str(shared / Path(case["image"]).name)
    (seg_data / "dataset.json").write_text(json.dumps(description))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_datalist(seg_data, "seg2d")["training"][1]["image"] == str(shared / Path(moved[1]).name)
