import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_qsa.networks import SAUNet
from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.visualize import attention_maps, attention_statistics, default_layers

def _disc_images(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(count):
        cy, cx = torch.randint(9, size - 9, (2,), generator=generator).tolist()
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).float()
        images.append(mask + 0.3 * torch.randn(mask.shape, generator=generator))
        masks.append(mask)
    return torch.stack(images)[:, None], torch.stack(masks)[:, None]


def _object_correlation(network: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, layer: str) -> float:
    """Largest |Pearson r| between the attention-received map and the object mask or its boundary band (5 px),
    away from the image border."""
    received = attention_maps(network, images, [layer])[layer]["attention_received"]
    band = torch.nn.functional.max_pool2d(masks, 5, 1, 2) + torch.nn.functional.max_pool2d(-masks, 5, 1, 2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    return max(abs(float(torch.corrcoef(torch.stack([received[inner].flatten(), target[inner].flatten()]))[0, 1])) for target in (masks, band))


def test_attention_statistics_are_consistent():
    layer = StandAloneSelfAttention(2, 4, 8, kernel_size=3, num_heads=2).eval()
    x = torch.randn(1, 4, 10, 12)
    _, attention = layer(x, return_attention=True)
    stats = attention_statistics(attention, layer)
    # every position gives one unit per head, so the attention received sums to heads x positions
    assert stats["attention_received"].sum().item() == pytest.approx(2 * 10 * 12, rel=1e-4)
    assert (stats["attention_entropy"] >= 0).all() and (stats["attention_entropy"] <= np.log(9) + 1e-5).all()
    assert (stats["attention_distance"] <= 2**0.5 + 1e-5).all()
    # a corner position has 4 of 9 neighbours inside the image: it cannot attend further than sqrt(2) either way
    assert stats["attention_received"][0, 0, 0, 0] > 0


def test_attention_received_follows_the_object_after_training():
    """Threshold: after 150 steps on bright discs, |r| between attention received (last encoder layer) and the
    disc mask or its boundary is at least 0.35 and at least 1.5 times that of the same network untrained (an
    untrained network's attention already reacts a little to a bright object)."""
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3)
    layer = default_layers(net)[0]
    test_images, test_masks = _disc_images(8, seed=99)
    untrained = _object_correlation(net.eval(), test_images, test_masks, layer)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    net.train()
    for step in range(150):
        images, masks = _disc_images(8, seed=step)
        loss = torch.nn.functional.cross_entropy(net(images), masks[:, 0].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    trained = _object_correlation(net, test_images, test_masks, layer)
    assert trained >= 0.35 and trained >= 1.5 * untrained, (trained, untrained)
    # requesting maps does not change the prediction
    with torch.no_grad():
        before = net(test_images)
    maps = attention_maps(net, test_images)
    with torch.no_grad():
        torch.testing.assert_close(net(test_images), before)
    assert set(maps) == set(default_layers(net)) and maps[layer]["attention_entropy"].shape == (8, 1, 32, 32)


def test_explain_cli_writes_maps_in_the_input_geometry(tmp_path, untrained_bundle):
    bundle = untrained_bundle("sa_seg", tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = np.array([[0.0, -1.1, 0.0, 20.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    image = np.random.default_rng(0).normal(100, 20, (70, 90)).astype(np.float32)
    image[20:40, 30:55] += 400
    nib.save(nib.Nifti1Image(image, affine), inputs / "slice.nii.gz")

    run = [sys.executable, "-m", "monai_qsa"]
    subprocess.run([*run, "explain", "--bundle", str(bundle), "--input", str(inputs / "slice.nii.gz"), "--output", str(tmp_path / "maps")], check=True, timeout=600)
    subprocess.run([*run, "infer", "--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "pred")], check=True, timeout=600)
    maps = sorted((tmp_path / "maps").glob("slice_*.nii.gz"))
    names = {p.name for p in maps}
    assert {"slice_gradcam.nii.gz", "slice_seg.nii.gz"} <= names
    assert sum("attention_received" in n for n in names) == 2 and sum("attention_entropy" in n for n in names) == 2
    for path in maps:
        result = nib.load(path)
        assert result.shape == image.shape, path.name
        np.testing.assert_allclose(result.affine, affine, atol=1e-5)
        if path.name != "slice_seg.nii.gz":
            assert (tmp_path / "maps" / path.name.replace(".nii.gz", ".png")).stat().st_size > 1000
    # the prediction saved with the maps is the one plain inference gives
    np.testing.assert_array_equal(nib.load(tmp_path / "maps/slice_seg.nii.gz").get_fdata(), nib.load(tmp_path / "pred/slice_seg.nii.gz").get_fdata())
