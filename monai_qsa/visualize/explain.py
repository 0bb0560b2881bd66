"""Predictions with their explanations, saved aligned with the input: attention statistics and saliency maps as
NIfTI files in the input's geometry, and PNG overlays of image, prediction and map."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from monai.data import MetaTensor
from monai.transforms import Invertd, LoadImage

from monai_qsa.inference.batch import case_stem, list_inputs
from monai_qsa.inference.bundle_runner import BundleRunner, CaseError
from monai_qsa.utils.nifti import save_nifti
from monai_qsa.visualize.attention import attention_maps, default_layers
from monai_qsa.visualize.saliency import saliency_maps

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

__all__ = ["explain_case", "explain", "save_overlay"]


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or its middle slice along the last axis."""
    return array if array.ndim == 2 else array[..., array.shape[-1] // 2]


def save_overlay(image: np.ndarray, prediction: np.ndarray | None, heatmap: np.ndarray, title: str, target: Path) -> Path:
    """PNG with three panels: image, image with the prediction's outline, image with the map (middle slice in 3D)."""
    image, heatmap = _middle_slice(image).T, _middle_slice(heatmap).T
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for axis in axes:
        axis.imshow(image, cmap="gray", origin="lower")
        axis.axis("off")
    axes[0].set_title("image")
    if prediction is not None:
        axes[1].contour(_middle_slice(prediction).T, levels=[0.5], colors="red", linewidths=1.0, origin="lower")
    axes[1].set_title("prediction")
    shown = axes[2].imshow(heatmap, cmap="jet", alpha=0.5, origin="lower")
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    axes[2].set_title(title)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def explain_case(
    runner: BundleRunner, path: Path, output_dir: Path, stem: str, methods: tuple[str, ...] = ("gradcam",),
    predictor: BundleRunner | None = None,
) -> dict[str, Path]:
    """Prediction, attention maps (default layers of ``runner``'s fp32 network) and saliency maps of one file,
    written as ``<stem>_<map>.nii.gz`` in the input's geometry and ``<stem>_<map>.png``.

    Args:
        runner: the bundle with its fp32 network, which the maps are taken from.
        path: input image.
        output_dir: folder for the files.
        stem: output name stem.
        methods: saliency methods besides attention (see :data:`~monai_qsa.visualize.saliency.SALIENCY_METHODS`).
        predictor: the runner whose prediction is saved (e.g. the int8 model); default ``runner``.

    Returns:
        written files by map name (``prediction`` included).
    """
    predictor = predictor or runner
    data = runner.preprocess(path)  # the same preprocessing for the prediction and the maps
    image = data["image"].unsqueeze(0).to(runner.device)
    network = runner.network
    prediction = predictor.predict(dict(data)).pred
    class_index = 1 if runner.is_segmentation else int(prediction.argmax())
    maps = {}
    for layer, stats in attention_maps(network, image).items():
        maps.update({f"{name}_{layer.replace('.', '-')}": value for name, value in stats.items()})
    layer = default_layers(network)[0].rsplit(".", 1)[0]  # the SA unit holding the attention: activations after it
    maps.update(saliency_maps(network, image, layer, class_index, methods))
    # back to the input's geometry through the bundle's own preprocessing, as its predictions are
    inverted = Invertd(keys=list(maps), transform=runner.preprocessing, orig_keys="image", nearest_interp=False)(
        {"image": data["image"], **{name: MetaTensor(value[0].cpu(), meta=data["image"].meta) for name, value in maps.items()}}
    )
    written = {}
    source_array = np.asarray(LoadImage(image_only=True)(str(path)))  # the input as stored, for the PNGs
    # segmentation label maps are (1, *S), or S for the 2D bundle (channel squeezed, as MONAI Label needs)
    pred_array = np.asarray(prediction[0] if prediction.ndim == data["image"].ndim else prediction) if runner.is_segmentation else None
    if runner.is_segmentation:
        written["prediction"] = save_nifti(prediction, output_dir / f"{stem}_seg.nii.gz", dtype="uint8")
    for name in maps:
        written[name] = save_nifti(inverted[name], output_dir / f"{stem}_{name}.nii.gz")
        save_overlay(source_array, pred_array, np.asarray(inverted[name][0]), name, output_dir / f"{stem}_{name}.png")
    return written


def explain(
    bundle: str | os.PathLike, inputs: str | os.PathLike, output_dir: str | os.PathLike, int8: bool = False,
    methods: tuple[str, ...] = ("gradcam",),
) -> int:
    """``python -m monai_qsa explain``: maps and predictions for one file or every file of a folder.

    Returns:
        0 if every file was explained, 1 if any failed (each failure is printed with its reason).
    """
    inputs, output_dir = Path(inputs).resolve(), Path(output_dir).resolve()
    if not inputs.exists():
        raise FileNotFoundError(f"--input {inputs} does not exist.")
    files = [inputs] if inputs.is_file() else list_inputs(inputs, recursive=False)
    runner = BundleRunner(bundle)
    predictor = BundleRunner(bundle, int8=True) if int8 else None
    failed = 0
    for path in files:
        try:
            written = explain_case(runner, path, output_dir, case_stem(path), methods, predictor)
            print(f"{path}: {len(written)} files in {output_dir}")
        except (CaseError, RuntimeError, ValueError) as error:
            failed += 1
            print(f"{path}: failed: {error}")
    return 1 if failed else 0
