"""Predictions with their explanations, saved aligned with the input: attention statistics and saliency maps as
NIfTI files in the input's geometry, and PNG overlays of image, prediction and map with the map's legend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from monai.data import MetaTensor
from monai.transforms import Invertd, LoadImage

from monai_qsa.data.folders import InputEntry, scan_inputs
from monai_qsa.inference.bundle_runner import BundleRunner
from monai_qsa.inference.cases import CaseRecord, case_record
from monai_qsa.inference.inputs import case_stem
from monai_qsa.utils.nifti import save_nifti
from monai_qsa.visualize.attention import attention_maps
from monai_qsa.visualize.saliency import saliency_maps

matplotlib.use("Agg")
from matplotlib import colors
from matplotlib import pyplot as plt

__all__ = ["explain_case", "explain", "save_overlay"]


@dataclass(frozen=True)
class _Legend:
    """How a map is drawn: colour map, value range (None: the map's own) and the colour bar's label."""

    cmap: str
    label: str
    vmin: float | None = None
    vmax: float | None = None
    centre: float | None = None  # diverging maps (of values >= 0): this value is white

    def norm(self, values: np.ndarray) -> colors.Normalize:
        if self.centre is None:
            return colors.Normalize(self.vmin, self.vmax)
        spread = max(float(np.nanmax(np.abs(values - self.centre))), 1e-6)
        return colors.TwoSlopeNorm(self.centre, max(0.0, self.centre - spread), self.centre + spread)


_CAM_LABEL = "support of the predicted structure\n(0 none, 1 strongest in this case)"
_LEGENDS = {
    "gradcam": _Legend("inferno", f"GradCAM: {_CAM_LABEL}", 0.0, 1.0),
    "gradcampp": _Legend("inferno", f"GradCAM++: {_CAM_LABEL}", 0.0, 1.0),
    "occlusion": _Legend("coolwarm", "score drop when hidden\n(red: needed, blue: hides evidence against)", -1.0, 1.0),
    "attention_received": _Legend(
        "coolwarm", "attention received / uniform\n(1 as uniform attention, red: looked at more)", centre=1.0
    ),
    "attention_entropy": _Legend("viridis", "attention entropy / maximum\n(0 one neighbour, 1 uniform)", 0.0, 1.0),
    "attention_distance": _Legend("viridis", "mean attended distance\n(voxels of that layer)", 0.0),
}


def _legend(name: str) -> _Legend:
    """The legend of map ``name`` (attention maps are named ``<statistic>_<layer>``)."""
    longest_first = sorted(_LEGENDS, key=len, reverse=True)  # gradcampp before gradcam
    return _LEGENDS[next(key for key in longest_first if name.startswith(key))]


def _slice_index(array: np.ndarray, prediction: np.ndarray | None) -> int:
    """The slice (last axis) a 3D overlay shows: where the prediction has most foreground, else the middle one."""
    if prediction is not None and prediction.any():
        return int(np.argmax((prediction > 0).reshape(-1, prediction.shape[-1]).sum(0)))
    return array.shape[-1] // 2


def _view(array: np.ndarray, index: int | None) -> np.ndarray:
    """A 2D view for display (first axis horizontal): the array itself, or slice ``index`` of the last axis."""
    return (array if index is None else array[..., index]).T


def save_overlay(
    image: np.ndarray, prediction: np.ndarray | None, heatmap: np.ndarray, title: str, target: Path
) -> Path:
    """PNG with three panels: the image, the image with the prediction's outline, and the map over the image with
    the outline and the map's legend (3D: the slice with most predicted foreground, else the middle one).

    Args:
        image: the input as stored, ``S``.
        prediction: the label map on the same grid, or None (classification).
        heatmap: the map on the same grid.
        title: the map's name (``gradcam``, ``attention_received_<layer>``, ...), which also selects its legend.
        target: the PNG to write.
    """
    index = _slice_index(image, prediction) if image.ndim == 3 else None
    image, heatmap = _view(image, index), _view(heatmap, index)
    outline = None if prediction is None else _view(prediction, index)
    legend = _legend(title)
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for axis in axes:
        axis.imshow(image, cmap="gray", origin="lower")
        axis.axis("off")
    shown = axes[2].imshow(heatmap, cmap=legend.cmap, norm=legend.norm(heatmap), alpha=0.6, origin="lower")
    if outline is not None and outline.any():
        for axis in axes[1:]:
            axis.contour(outline, levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
    slice_note = "" if index is None else f" (slice {index} of the last axis)"
    axes[0].set_title("image" + slice_note)
    axes[1].set_title("prediction" if prediction is not None else "")
    axes[2].set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes[2], fraction=0.046).set_label(legend.label, fontsize=8)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def explain_case(
    runner: BundleRunner,
    path: Path,
    output_dir: Path,
    stem: str,
    methods: tuple[str, ...] = ("gradcam",),
    predictor: BundleRunner | None = None,
) -> list[Path]:
    """Prediction, attention maps (default layers of ``runner``'s fp32 network) and saliency maps of one file,
    written as ``<stem>_<map>.nii.gz`` in the input's geometry with a ``<stem>_<map>.png`` overlay each, and
    ``<stem>_seg.nii.gz`` (segmentation).

    Args:
        runner: the bundle with its fp32 network, which the maps are taken from.
        path: input image.
        output_dir: folder for the files.
        stem: output name stem.
        methods: saliency methods besides attention (see :data:`~monai_qsa.visualize.saliency.SALIENCY_METHODS`).
        predictor: the runner whose prediction is saved (e.g. the int8 model); default ``runner``.

    Returns:
        every file written, the prediction first.
    """
    predictor = predictor or runner
    data = runner.preprocess(path)  # the same preprocessing for the prediction and the maps
    image = data["image"].unsqueeze(0).to(runner.device)
    network = runner.network
    prediction = predictor.predict(dict(data)).pred
    # segmentation: every foreground class over the fp32 network's own predicted region; classification: the
    # class of the saved prediction
    classes = None if runner.is_segmentation else int(prediction.argmax())
    maps = {}
    for layer, stats in attention_maps(network, image).items():
        maps.update({f"{name}_{layer.replace('.', '-')}": value for name, value in stats.items()})
    maps.update(saliency_maps(network, image, classes, methods))
    # back to the input's geometry through the bundle's own preprocessing, as its predictions are
    meta = data["image"].meta
    inverted = Invertd(keys=list(maps), transform=runner.preprocessing, orig_keys="image", nearest_interp=False)(
        {"image": data["image"], **{name: MetaTensor(value[0].cpu(), meta=meta) for name, value in maps.items()}}
    )
    written = []
    source_array = np.asarray(LoadImage(image_only=True)(str(path)))  # the input as stored, for the PNGs
    pred_array = None
    if runner.is_segmentation:
        written.append(save_nifti(prediction, output_dir / f"{stem}_seg.nii.gz", dtype="uint8"))
        # segmentation label maps are (1, *S), or S for the 2D bundle (channel squeezed, as MONAI Label needs)
        pred_array = np.asarray(prediction[0] if prediction.ndim == data["image"].ndim else prediction)
    for name in maps:
        written.append(save_nifti(inverted[name], output_dir / f"{stem}_{name}.nii.gz"))
        heatmap = np.asarray(inverted[name][0])
        written.append(save_overlay(source_array, pred_array, heatmap, name, output_dir / f"{stem}_{name}.png"))
    return written


def explain(
    bundle: str | os.PathLike,
    inputs: str | os.PathLike,
    output_dir: str | os.PathLike,
    int8: bool = False,
    methods: tuple[str, ...] = ("gradcam",),
) -> int:
    """``python -m monai_qsa explain``: maps and predictions for one file or every file of a folder; prints one line
    per entry: the number of files written, or why the entry was not explained. A bad file does not stop the others
    (the failure policy of ``infer``: :func:`monai_qsa.inference.cases.case_record`).

    Returns:
        0 if every file was explained, 1 if any failed.
    """
    inputs, output_dir = Path(inputs).resolve(), Path(output_dir).resolve()
    if not inputs.exists():
        raise FileNotFoundError(f"--input {inputs} does not exist.")
    entries = [InputEntry(inputs)] if inputs.is_file() else scan_inputs(inputs, recursive=False)
    runner = BundleRunner(bundle)
    predictor = BundleRunner(bundle, int8=True) if int8 else None

    def explain_file(path: Path) -> CaseRecord:
        written = explain_case(runner, path, output_dir, case_stem(path), methods, predictor)
        return CaseRecord(str(path), "ok", f"{len(written)} files in {output_dir}", output=str(written[0]))

    failed = 0
    for entry in entries:
        record = case_record(entry, explain_file)
        failed += record.status == "failed"
        print(
            f"{record.file}: {record.reason}"
            if record.status == "ok"
            else f"{record.file}: {record.status}: {record.reason}"
        )
    return 1 if failed else 0
