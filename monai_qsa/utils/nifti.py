"""Writing images with their geometry, never leaving a partial file under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.data import NibabelWriter

__all__ = ["save_nifti"]


def save_nifti(image: torch.Tensor, target: str | os.PathLike, dtype: str = "float32") -> Path:
    """Save a MetaTensor as NIfTI with the affine in its metadata (no resampling): channel-first ``(C, *S)``, or
    ``S`` alone (a 2D label map ``(H, W)``, as the 2D segmentation bundle gives for MONAI Label); which one is read
    from ``meta["spatial_shape"]``.

    It is written under a hidden temporary name in the target folder (keeping the ``.nii.gz`` suffix the writer
    needs) and renamed, so a killed process never leaves a truncated file under ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".partial.{target.name}")
    writer = NibabelWriter(output_dtype=dtype)
    spatial_dims = len(image.meta.get("spatial_shape", image.shape[1:]))
    writer.set_data_array(image, channel_dim=0 if image.ndim > spatial_dims else None)
    writer.set_metadata(image.meta, resample=False)
    try:
        writer.write(str(partial), verbose=False)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
