import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_qsa.networks import SAUNet
from monai_qsa.networks.blocks import StandAloneSelfAttention
from monai_qsa.visualize import attention_maps, attention_statistics, default_layers, saliency_maps
from monai_qsa.visualize.attention import upsample_to_grid
from monai_qsa.visualize.saliency import gradcam_layer


def test_attention_statistics_are_relative_to_uniform_attention():
    layer = StandAloneSelfAttention(2, 4, 8, kernel_size=3, num_heads=2).eval()
    x = torch.randn(1, 4, 10, 12)
    _, attention = layer(x, return_attention=True)
    stats = attention_statistics(attention, layer)
    assert (stats["attention_entropy"] >= 0).all() and (stats["attention_entropy"] <= 1 + 1e-5).all()
    assert (stats["attention_distance"] <= 2**0.5 + 1e-5).all() and (stats["attention_received"] > 0).all()
    # zero queries: every position attends uniformly to its valid neighbours (4 of 9 at a corner, 6 on an edge);
    # then every position, border and corner included, receives exactly what uniform attention gives: 1
    with torch.no_grad():
        layer.qkv.weight.zero_()
    _, uniform = layer(x, return_attention=True)
    stats = attention_statistics(uniform, layer)
    torch.testing.assert_close(stats["attention_received"], torch.ones(1, 1, 10, 12))
    torch.testing.assert_close(stats["attention_entropy"], torch.ones(1, 1, 10, 12))
    assert stats["attention_distance"][0, 0, 0, 0] < stats["attention_distance"][0, 0, 5, 5]  # fewer far neighbours


@pytest.mark.parametrize("size", [(16,), (13, 16), (9, 10, 11)])
def test_upsampled_maps_stay_on_their_pooled_cells(size):
    """A layer cell after pooling by 4 covers image positions 4i .. 4i+3: its peak lands there, whatever the size."""
    pooled = [s // 4 for s in size]
    values = torch.zeros(1, 1, *pooled)
    values[(0, 0, *[p - 1 for p in pooled])] = 1.0  # the last cell, most displaced by stretching to the image size
    upsampled = upsample_to_grid(values, size)
    assert upsampled.shape == (1, 1, *size)
    peak = np.unravel_index(int(upsampled.argmax()), size)
    assert all(4 * (p - 1) <= i <= 4 * p - 1 for i, p in zip(peak, pooled)), (peak, pooled)


def test_maps_leave_the_prediction_unchanged_and_gradcam_follows_the_predicted_region():
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3).eval()
    images = torch.rand(2, 1, 20, 24)
    with torch.no_grad():
        before = net(images)
    maps = attention_maps(net, images)
    with torch.no_grad():
        torch.testing.assert_close(net(images), before)
    assert set(maps) == set(default_layers(net))
    assert maps[default_layers(net)[0]]["attention_entropy"].shape == (2, 1, 20, 24)
    assert default_layers(net)[1] == "decoder.0.attend.1.attn" and gradcam_layer(net) == "decoder.0"
    saliency = saliency_maps(net, images, methods=("gradcam", "gradcampp"))
    for name, value in saliency.items():
        assert value.shape == (2, 1, 20, 24) and torch.isfinite(value).all(), name
        # per case: 1 at its strongest, or 0 everywhere where nothing supports the prediction
        assert all(float(case.max()) in (0.0, 1.0) and float(case.min()) >= 0 for case in value), name
    # a network predicting no foreground has nothing to explain: the map is 0, not noise normalised to 1
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([1e4, -1e4]))
    assert saliency_maps(net, images)["gradcam"].abs().max() == 0
    with pytest.raises(ValueError, match="indices of the 2 output channels"):
        saliency_maps(net, images, classes=[2])


def test_explain_cli_writes_maps_in_the_input_geometry(tmp_path, untrained_bundle):
    bundle = untrained_bundle("sa_seg", tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = np.array([[0.0, -1.1, 0.0, 20.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    image = np.random.default_rng(0).normal(100, 20, (70, 90)).astype(np.float32)
    image[20:40, 30:55] += 400
    nib.save(nib.Nifti1Image(image, affine), inputs / "slice.nii.gz")

    run = [sys.executable, "-m", "monai_qsa"]
    explain = [*run, "explain", "--bundle", str(bundle), "--input", str(inputs / "slice.nii.gz")]
    explained = subprocess.run(
        [*explain, "--output", str(tmp_path / "maps")], check=True, timeout=600, capture_output=True, text=True
    )
    infer = [*run, "infer", "--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "pred")]
    subprocess.run(infer, check=True, timeout=600)
    maps = sorted((tmp_path / "maps").glob("slice_*.nii.gz"))
    # the prediction, 2 layers x 3 statistics and GradCAM, each map with its PNG: the count printed is the count written
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert len(written) == 15 and f"{len(written)} files in" in explained.stdout, (written, explained.stdout)
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
    saved, inferred = (nib.load(tmp_path / f"{folder}/slice_seg.nii.gz").get_fdata() for folder in ("maps", "pred"))
    np.testing.assert_array_equal(saved, inferred)


def test_explain_goes_on_past_bad_files_and_reports_every_entry(tmp_path, untrained_bundle, capsys):
    """explain shares infer's failure policy: a corrupt file, a non-image and a hidden file are each reported and
    the good file is still explained."""
    from monai_qsa.visualize.explain import explain

    bundle = untrained_bundle("sa_seg", tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.random.default_rng(0).normal(100, 20, (40, 36)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not gzip data at all")
    (inputs / "notes.txt").write_text("not an image")
    (inputs / ".hidden.nii.gz").write_bytes(b"")

    status = explain(bundle, inputs, tmp_path / "maps", methods=())
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert status == 1
    assert lines[str(inputs / "good.nii.gz")].endswith(f"files in {tmp_path / 'maps'}")
    assert lines[str(inputs / "broken.nii.gz")].startswith("failed: unreadable image header")
    assert lines[str(inputs / "notes.txt")].startswith("failed: unsupported extension")
    assert lines[str(inputs / ".hidden.nii.gz")].startswith("ignored: hidden entry")
    assert (tmp_path / "maps" / "good_seg.nii.gz").is_file()


@pytest.mark.parametrize("spatial", [(2, 3), (1, 1), (6, 2)])
def test_attention_statistics_on_maps_smaller_than_the_neighbourhood(spatial):
    """Deep levels of strided SAUNets are smaller than the 7x7 neighbourhood: every map stays finite."""
    layer = StandAloneSelfAttention(2, 8, 8, kernel_size=7, num_heads=2).eval()
    with torch.no_grad():
        _, attention = layer(torch.randn(1, 8, *spatial), return_attention=True)
    for name, value in attention_statistics(attention, layer).items():
        assert value.shape == (1, 1, *spatial) and torch.isfinite(value).all(), name
