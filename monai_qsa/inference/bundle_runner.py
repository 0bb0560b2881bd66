"""Run one case at a time through a bundle's own inference pipeline (preprocessing, network, inferer,
postprocessing), leaving the writing of outputs to the caller. Bad input is refused with the root cause: header
checks before anything is loaded, then the cause at the bottom of MONAI's exception chain."""

from __future__ import annotations

import gzip
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, LoadImaged, SaveImaged

from monai_qsa.bundle import bundle_workflow
from monai_qsa.data.headers import ImageHeader, read_image_header

__all__ = [
    "BundleRunner",
    "CaseError",
    "bundle_metadata",
    "predicts_segmentation",
    "root_cause",
    "describe_error",
    "MAX_IMAGE_VOXELS",
    "MIN_SPATIAL_SIZE",
    "parse_device",
]

MAX_IMAGE_VOXELS = 1024**3
"""Largest image accepted, in voxels (channels included) as the header states them: 1024^3, 4 GiB as float32.
Larger headers are refused before any pixel data is read."""

MIN_SPATIAL_SIZE = 2
"""Fewest voxels accepted along each spatial axis: an axis of one voxel cannot be told from a missing one."""

NOTE_KEY = "preprocessing_note"
"""Entry of the preprocessed case dictionary holding a remark for the run summary (e.g. NaN voxels replaced)."""


class CaseError(ValueError):
    """A case that cannot be processed; the message is the per-file reason reported to the user."""


@dataclass
class CaseResult:
    """Postprocessed prediction of one case: a MetaTensor (segmentation, in the input's geometry) or class
    probabilities; ``note`` is a remark on the input for the run summary (empty if none)."""

    pred: torch.Tensor
    seconds: float
    note: str = ""


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`.

    Raises:
        ValueError: it names no torch device (``cpu``, ``cuda``, ``cuda:1``, ...).
    """
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"--device {device!r} is not a torch device such as cpu, cuda or cuda:1 ({error})") from error


def bundle_metadata(bundle_dir: str | os.PathLike) -> dict:
    """``configs/metadata.json`` of a bundle, after checking that ``bundle_dir`` is one.

    Raises:
        FileNotFoundError: ``configs/inference.json`` or ``configs/metadata.json`` is missing.
    """
    bundle_dir = Path(bundle_dir).resolve()
    config, meta = bundle_dir / "configs" / "inference.json", bundle_dir / "configs" / "metadata.json"
    if not config.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"{bundle_dir} is not a bundle: it needs configs/inference.json and configs/metadata.json."
        )
    return json.loads(meta.read_text())


def predicts_segmentation(metadata: dict) -> bool:
    """Whether a bundle's ``pred`` output is a segmentation (otherwise class scores)."""
    return metadata["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"


def root_cause(error: BaseException) -> BaseException:
    """The exception at the bottom of ``error``'s explicit chain (``raise ... from``), as MONAI's
    ``apply_transform`` and config evaluation chain them."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def describe_error(error: BaseException) -> str:
    """A per-file reason naming the root cause of ``error``."""
    cause = root_cause(error)
    text = _message(cause)
    if isinstance(cause, EOFError):
        return f"truncated file: the data end before the size its header states ({text})"
    if isinstance(cause, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt compressed data ({type(cause).__name__}: {text})"
    if isinstance(cause, MemoryError):
        return "not enough memory to load or process it"
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class BundleRunner:
    """A bundle's ``configs/inference.json`` pipeline, case by case.

    Args:
        bundle_dir: the bundle folder (``configs/inference.json`` and ``configs/metadata.json``, trained ``models/``).
        int8: run the int8 artifact ``models/model_int8.pt2`` instead of ``models/model.pt``.
        device: torch device for the network (int8 models run on the CPU).
    """

    def __init__(self, bundle_dir: str | os.PathLike, int8: bool = False, device: str = "cpu") -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.metadata = bundle_metadata(self.bundle_dir)
        self.device = parse_device(device)  # validated, then passed as the object: never evaluated as an expression
        workflow = bundle_workflow(self.bundle_dir, use_int8=int8, device=self.device)
        self.spatial_dims = int(workflow.parser.get_parsed_content("network_def#spatial_dims"))
        self.is_segmentation = predicts_segmentation(self.metadata)
        self.preprocessing = workflow.preprocessing
        self.inferer = workflow.inferer
        self.network = workflow.parser.get_parsed_content("network").to(self.device).eval()
        postprocessing = workflow.postprocessing
        # outputs are written by the caller (temporary name, then rename), not by the bundle's SaveImaged
        self.postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveImaged)])
        self.labels = self.metadata["network_data_format"]["outputs"]["pred"].get("channel_def", {})

    def check_header(self, path: Path) -> None:
        """Refuse, before loading, files this bundle cannot take: wrong dimensionality, empty, larger than
        :data:`MAX_IMAGE_VOXELS`, shorter than their header states, fewer than :data:`MIN_SPATIAL_SIZE` voxels along
        a spatial axis, or a singular voxel-to-world matrix."""
        try:
            header = read_image_header(path)
        except Exception as error:
            raise CaseError(f"unreadable image header: {describe_error(error)}") from error
        shape = header.shape
        spatial = [s for s in shape if s != 1] if len(shape) > self.spatial_dims else list(shape)
        if len(spatial) != self.spatial_dims:
            dims = f"{self.spatial_dims}D"
            raise CaseError(f"wrong dimensionality: shape {shape} is not a {dims} image for this {dims} bundle")
        if 0 in shape:
            raise CaseError(f"empty image: shape {shape}")
        voxels = int(np.prod(shape, dtype=np.int64))
        if voxels > MAX_IMAGE_VOXELS:
            raise CaseError(
                f"implausible size: the header states shape {shape} ({voxels:,} voxels), over the limit of "
                f"{MAX_IMAGE_VOXELS:,} voxels"
            )
        size = path.stat().st_size
        if header.expected_bytes is not None and size < header.expected_bytes:
            raise CaseError(f"truncated file: its header states {header.expected_bytes:,} bytes, the file has {size:,}")
        if min(spatial) < MIN_SPATIAL_SIZE:
            raise CaseError(
                f"image too small: shape {shape}; this bundle needs at least {MIN_SPATIAL_SIZE} voxels along each of "
                f"its {self.spatial_dims} spatial axes"
            )
        _check_voxel_to_world(header)

    def preprocess(self, path: Path) -> dict:
        """The bundle's preprocessing of one file; :class:`CaseError` with the reason when it is bad input.

        Non-finite voxels (NaN, inf) in an image that has finite ones are replaced, right after loading, by the
        image's finite minimum, and counted in ``data[NOTE_KEY]``; an image without any finite voxel is refused.
        """
        self.check_header(path)
        data: dict = {"image": str(path)}
        loaded = _end_of_loading(self.preprocessing)
        try:
            data = self.preprocessing(data, end=loaded)  # all of it if no loading step is found
            note = _replace_non_finite(data["image"])
            if loaded is not None:
                data = self.preprocessing(data, start=loaded)
        except CaseError:
            raise
        except Exception as error:
            raise CaseError(f"cannot load/preprocess: {describe_error(error)}") from error
        if not torch.isfinite(data["image"]).all():
            raise CaseError("preprocessing produced non-finite values (NaN/inf)")
        data[NOTE_KEY] = note
        return data

    def predict(self, data: dict) -> CaseResult:
        """Inference and postprocessing of one preprocessed case (``data`` gains the ``pred`` entry)."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0].cpu()
            seconds = time.perf_counter() - start
            pred = self.postprocessing(data)["pred"]
        except Exception as error:
            raise CaseError(f"inference failed: {describe_error(error)}") from error
        return CaseResult(pred=pred, seconds=seconds, note=data.get(NOTE_KEY, ""))

    def run(self, path: Path) -> CaseResult:
        """Preprocess, infer and postprocess one file."""
        return self.predict(self.preprocess(path))


def _check_voxel_to_world(header: ImageHeader) -> None:
    """Refuse a voxel-to-world matrix that cannot be inverted (zero spacing, a zero or repeated direction)."""
    sizes = header.shape[: header.voxel_to_world.shape[1]]
    matrix = header.voxel_to_world[:, [axis for axis, size in enumerate(sizes) if size > 1]]
    if not np.isfinite(matrix).all():
        raise CaseError(f"invalid affine: non-finite voxel-to-world matrix in the header {matrix.tolist()}")
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    if singular_values[0] == 0 or singular_values[-1] <= 1e-6 * singular_values[0]:
        raise CaseError(
            f"singular affine: the header's voxel-to-world matrix {np.round(matrix, 6).tolist()} cannot be inverted "
            "(zero spacing or degenerate directions)"
        )


def _end_of_loading(preprocessing: Compose) -> int | None:
    """Index just after the ``LoadImaged`` step of ``preprocessing`` (``None``: there is none)."""
    indices = [i for i, t in enumerate(preprocessing.transforms) if isinstance(t, LoadImaged)]
    return indices[0] + 1 if indices else None


def _replace_non_finite(image: torch.Tensor) -> str:
    """Replace NaN/inf voxels of a loaded image in place by its finite minimum; the note for the summary."""
    finite = torch.isfinite(image)
    if finite.all():
        return ""
    if not finite.any():
        raise CaseError("image has no finite value (all NaN/inf)")
    bad = int((~finite).sum())
    fill = float(image[finite].min())
    image[~finite] = fill
    share = f"{bad} of {image.numel()} voxels ({100 * bad / image.numel():.2g}%)"
    return f"{share} were NaN/inf: replaced by the image's finite minimum {fill:g}"


def _message(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (its lines joined), cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
