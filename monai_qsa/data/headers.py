"""What an image header says, read without the pixel data: the one header reader of the project."""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

__all__ = ["ImageHeader", "read_image_header"]


@dataclass(frozen=True)
class ImageHeader:
    """What an image header says, read without the pixel data.

    Attributes:
        shape: array shape (spatial axes first, then components if more than one).
        voxel_to_world: linear part of the voxel-to-world transform (one column per spatial axis).
        expected_bytes: file size the header implies for uncompressed single-file formats, else ``None``.
    """

    shape: tuple[int, ...]
    voxel_to_world: np.ndarray
    expected_bytes: int | None = None


def read_image_header(path: str | os.PathLike) -> ImageHeader:
    """Read the header of a NIfTI (nibabel) or ITK-format (SimpleITK) image file."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        image = nib.load(path)
        shape = tuple(int(s) for s in image.shape)
        expected = None
        if name.endswith(".nii"):
            header = image.header
            data_bytes = int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
            expected = int(image.dataobj.offset) + data_bytes
        return ImageHeader(shape, np.asarray(image.affine, dtype=float)[:3, : min(len(shape), 3)], expected)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(len(size), len(size))
    return ImageHeader(size + ((components,) if components > 1 else ()), direction @ np.diag(reader.GetSpacing()))
