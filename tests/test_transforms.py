import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd as MonaiSpacingd

from monai_qsa.transforms import Spacingd


def test_spacingd_keeps_string_entries_and_inverts():
    image = MetaTensor(
        torch.rand(1, 8, 10, 6),
        affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])),
        meta={"filename_or_obj": "case.nii.gz"},
    )
    data = {"image": image, "image_path": "/studies/case.nii.gz", "image_meta_dict": {}}
    with pytest.raises(AttributeError):  # what MONAI Label hits with MONAI's own transform
        MonaiSpacingd(keys="image", pixdim=(2.0, 2.0, 2.0))(dict(data))
    transform = Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0))
    out = transform(dict(data))
    expected = MonaiSpacingd(keys="image", pixdim=(2.0, 2.0, 2.0))({"image": image})["image"]
    assert out["image"].shape == expected.shape and torch.allclose(out["image"], expected)
    assert out["image_path"] == "/studies/case.nii.gz"
    assert torch.allclose(out["image_meta_dict"]["affine"].float(), out["image"].affine.float())
    assert transform.inverse(out)["image"].shape == (1, 8, 10, 6)
