"""``Orientation``/``Orientationd`` whose inverse also fits 2D images read from NIfTI files.

A 2D NIfTI image carries a 4x4 affine. MONAI 1.6's ``Orientation.inverse`` derives the original axis codes from
that whole affine, so it undoes the reorientation of a 2D image with three codes (``('L', 'A', 'S')``) and warns
"axcodes ... length is smaller than number of input spatial dimensions D=2 ... please make sure the input is in the
channel-first format" on every 2D ``Invertd``, although the input is channel-first and the result is right. Here the
inverse reads the original affine at the data's spatial rank, so the codes match the data.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import monai.transforms
import nibabel as nib
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.utils.enums import SpaceKeys, TraceKeys

__all__ = ["Orientation", "Orientationd"]

#: MONAI's axis labels for images in LPS space (ITK); RAS-space images use nibabel's defaults
_LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))


class Orientation(monai.transforms.Orientation):
    """MONAI's :class:`monai.transforms.Orientation` (same arguments, same forward transform) whose inverse uses as
    many axis codes as the data has spatial dimensions.

    Example::

        oriented = Orientation(axcodes="RA", labels=None)(image)  # image: (C, H, W) MetaTensor from a 2D NIfTI
        restored = Orientation(axcodes="RA", labels=None).inverse(oriented)
    """

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        spatial_rank = len(data.peek_pending_shape()) if isinstance(data, MetaTensor) else data.ndim - 1
        original_affine = to_affine_nd(spatial_rank, transform[TraceKeys.EXTRA_INFO]["original_affine"])
        labels = self.labels
        in_lps_space = isinstance(data, MetaTensor) and SpaceKeys(data.meta.get("space", "RAS")) == SpaceKeys.LPS
        if labels is None and in_lps_space:
            labels = _LPS_LABELS
        original_axcodes = nib.orientations.aff2axcodes(original_affine, labels=labels)
        restore = monai.transforms.Orientation(axcodes=original_axcodes, labels=labels)
        with restore.trace_transform(False):
            return restore(data)


class Orientationd(monai.transforms.Orientationd):
    """MONAI's :class:`monai.transforms.Orientationd` (same arguments) built on :class:`Orientation`, so that
    ``Invertd`` takes 2D predictions back to the input's orientation without a spurious warning.

    Example::

        Orientationd(keys="image", axcodes="RA", labels=None)({"image": image})
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        axcodes: str | None = None,
        as_closest_canonical: bool = False,
        labels: Sequence[tuple[str, str]] | None = None,
        allow_missing_keys: bool = False,
        lazy: bool = False,
    ) -> None:
        super().__init__(keys, axcodes, as_closest_canonical, labels, allow_missing_keys, lazy)
        self.ornt_transform = Orientation(
            axcodes=axcodes, as_closest_canonical=as_closest_canonical, labels=labels, lazy=lazy
        )
