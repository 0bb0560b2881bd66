"""Writing images with their geometry, never leaving a partial file under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.data import NibabelWriter

from monai_qsa.utils.files import atomic_write

__all__ = ["save_nifti"]


def save_nifti(image: torch.Tensor, target: str | os.PathLike, dtype: str = "float32") -> Path:
    """Save a MetaTensor as NIfTI with the affine in its metadata (no resampling): channel-first ``(C, *S)``, or
    ``S`` alone (a 2D label map ``(H, W)``, as the 2D segmentation bundle gives for MONAI Label); which one is read
    from ``meta["spatial_shape"]``.

    Written through :func:`~monai_qsa.utils.files.atomic_write`, so a killed process never leaves a truncated file
    under ``target`` and concurrent writers never share a temporary file.
    """
    writer = NibabelWriter(output_dtype=dtype)
    spatial_dims = len(image.meta.get("spatial_shape", image.shape[1:]))
    writer.set_data_array(image, channel_dim=0 if image.ndim > spatial_dims else None)
    writer.set_metadata(image.meta, resample=False)
    with atomic_write(target) as partial:
        writer.write(str(partial), verbose=False)
    return Path(target)
