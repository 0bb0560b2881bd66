"""Each bundle states its network and preprocessing in two configs (train.json for training and evaluation,
inference.json for serving, as MONAI's model zoo expects self-contained configs): these tests fail as soon as the two
disagree, and as soon as the 2D and 3D segmentation bundles drift apart outside the settings that make them 2D/3D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
#: top-level settings both configs of a bundle use, which must therefore agree
SHARED_SETTINGS = ("task", "axcodes", "pixdim", "image_size", "roi_size", "network_def")
#: config paths in which sa_seg (2D) and sa_seg3d (3D) may differ: geometry, network, batch sizes, the 2D/3D
#: augmentations, the 2D label map squeezed to (H, W) for MONAI Label, and int8 3D convolutions (3D only)
DIMENSION_SETTINGS = (
    "/axcodes", "/pixdim", "/roi_size", "/patch_size", "/network_def", "/task", "/num_epochs", "/val_interval",
    "/batch_size", "/train/random_transforms", "/validate/inferer/sw_batch_size", "/inferer/sw_batch_size",
    "/postprocessing/transforms", "/quantization/int8_conv3d",
)  # fmt: skip


def _config(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / name).read_text())


def _on_image(transform: dict) -> dict | None:
    """The part of a dictionary transform that acts on the ``image`` key, keys and per-key arguments reduced to it;
    None if it does not touch the image."""
    keys = transform.get("keys")
    keys = [keys] if isinstance(keys, str) else list(keys or [])
    if "image" not in keys:
        return None
    position = keys.index("image")
    reduced = {}
    for name, value in transform.items():
        if name == "keys":
            value = "image"
        elif isinstance(value, list) and len(value) == len(keys) and len(keys) > 1:
            value = value[position]  # per-key argument, e.g. Spacingd's mode ["bilinear", "nearest"]
        reduced[name] = value
    return reduced


@pytest.mark.parametrize("bundle", ["sa_seg", "sa_seg3d", "sa_cls"])
def test_train_and_inference_preprocess_images_alike(bundle):
    train, inference = _config(bundle, "train.json"), _config(bundle, "inference.json")
    training_view = [t for t in map(_on_image, train["deterministic_transforms"]) if t is not None]
    serving_view = [t for t in map(_on_image, inference["preprocessing"]["transforms"]) if t is not None]
    assert training_view == serving_view


@pytest.mark.parametrize("bundle", ["sa_seg", "sa_seg3d", "sa_cls"])
def test_train_and_inference_share_network_and_settings(bundle):
    train, inference = _config(bundle, "train.json"), _config(bundle, "inference.json")
    for name in SHARED_SETTINGS:
        assert (name in train) == (name in inference), f"{bundle}: {name} is in only one of train/inference.json"
        assert train.get(name) == inference.get(name), f"{bundle}: {name} differs between train and inference.json"


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{path}/{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("name", ["train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"])
def test_segmentation_bundles_differ_only_in_their_dimension_settings(name):
    differences = _differences(_config("sa_seg", name), _config("sa_seg3d", name))
    unexpected = [d for d in differences if not d.startswith(DIMENSION_SETTINGS)]
    assert not unexpected, f"sa_seg and sa_seg3d {name} differ in: {unexpected}"
