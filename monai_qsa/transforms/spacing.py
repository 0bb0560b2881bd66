"""``Spacingd`` that tolerates non-dictionary ``<key>_*`` entries in the data.

MONAI 1.6's ``Spacingd`` copies the image's metadata into every entry whose name starts with ``"<key>_"`` when the
image comes from a NIfTI file, assuming each is a legacy ``*_meta_dict``. MONAI Label puts the file path in
``image_path`` (a string), so its inference fails with ``AttributeError: 'str' object has no attribute 'update'``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import monai.transforms

__all__ = ["Spacingd"]


class Spacingd(monai.transforms.Spacingd):
    """MONAI's :class:`monai.transforms.Spacingd` (same arguments, same inverse) that leaves entries such as
    ``image_path`` alone; only dictionaries named ``<key>_*`` receive the updated metadata, as intended.

    Example::

        Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear")({"image": img, "image_path": "a.nii.gz"})
    """

    def __call__(self, data: Mapping[Hashable, object], lazy: bool | None = None) -> dict:
        d = dict(data)
        set_aside = {
            name: d.pop(name)
            for name in list(d)
            if isinstance(name, str)
            and not isinstance(d[name], dict)
            and any(name.startswith(f"{key}_") for key in self.keys)
        }
        result = super().__call__(d, lazy=lazy)
        result.update(set_aside)
        return result
