"""The int8 resolution restore and head of SAUNets: ``torch.ops.monai_qsa.restore_head_int8`` on every path this
machine runs against its PyTorch reference, and the graph pass that puts it into int8 programs."""

import platform

import pytest
import torch
import torch.nn.functional as F

from monai_qsa.networks import SAUNet
from monai_qsa.networks.blocks.local_attention import CFLAGS_VARIABLE
from monai_qsa.networks.blocks.local_attention_int8 import PATH_VARIABLE, _library, int8_attention_paths
from monai_qsa.networks.blocks.restore_head_int8 import restore_head_int8_reference
from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized
from monai_qsa.utils.complexity import count_flops

RESTORE = torch.ops.monai_qsa.restore_head_int8


def _problem(batch=2, channels=4, stride=4, low=(8, 8), size=(32, 32), image_channels=1, mid=4, out=2,
             channels_last=True, strided=False, seed=0) -> tuple:  # fmt: skip
    """Random operator arguments, 2D or 3D (as many dimensions as ``low`` has): features of ``channels *
    stride**dims`` maps at ``low``, an image of ``size``; with ``strided``, the image, the weight scales and the
    biases are views with gaps (every other element)."""
    dims = len(low)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels * stride**dims, *low, generator=generator)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    step = 2 if strided else 1
    image = 2 * torch.randn(batch, image_channels, *size[:-1], size[-1] * step, generator=generator)[..., ::step]
    image[(0, 0) + (1,) * (dims - 1) + (2,)] = float("nan")  # the top code, as the int8 program's quantisation
    refine_weight = torch.randint(-127, 128, (mid, channels + image_channels) + (3,) * dims, generator=generator)
    head_weight = torch.randint(-127, 128, (out, mid) + (1,) * dims, generator=generator)
    refine_scale, head_scale = (0.001 + 0.01 * torch.rand(n * step, generator=generator)[::step] for n in (mid, out))
    refine_bias, head_bias = (torch.randn(n * step, generator=generator)[::step] for n in (mid, out))
    return (
        features, image, stride, 0.02, 46, refine_weight.to(torch.int8), refine_scale, refine_bias, 0.05, 3,
        head_weight.to(torch.int8), head_scale, head_bias,
    )  # fmt: skip


PROBLEMS = {
    "stem 4": {},
    "image larger (replicated)": {"low": (22, 34), "size": (90, 137)},
    "image smaller (cropped), row of 77": {"low": (20, 20), "size": (78, 77)},
    "stride 2, 8 refined, 3 out": dict(
        channels=8, stride=2, low=(9, 17), size=(18, 33), image_channels=2, mid=8, out=3
    ),
    "5 refined, contiguous, 1 out": {"batch": 1, "mid": 5, "out": 1, "channels_last": False},
    "smaller than a band and a vector, strided": {"low": (3, 3), "size": (11, 13), "strided": True},
    "3D stride 2": {"channels": 4, "stride": 2, "low": (5, 6, 7), "size": (10, 12, 14)},
    "3D more planes than an item, cropped and replicated": dict(
        batch=1, channels=3, stride=2, low=(9, 4, 5), size=(17, 9, 9), image_channels=2, mid=8, out=3
    ),
    "3D two bands, row of 33": {"batch": 1, "stride": 2, "low": (2, 10, 16), "size": (3, 20, 33)},
    "3D stride 4, contiguous, 5 refined, strided": dict(
        channels=2, low=(2, 3, 3), size=(8, 12, 11), mid=5, out=1, channels_last=False, strided=True
    ),
}


@pytest.mark.parametrize("name", PROBLEMS)
def test_every_path_computes_the_reference_to_the_bit(name, monkeypatch):
    problem = _problem(**PROBLEMS[name])
    expected = restore_head_int8_reference(*problem)
    assert expected.shape == (problem[1].shape[0], problem[10].shape[0], *problem[1].shape[2:])
    assert bool(expected.isfinite().all())
    paths = int8_attention_paths()
    assert "torch" in paths
    for path in paths:
        monkeypatch.setenv(PATH_VARIABLE, path)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(RESTORE(*problem), expected), (path, threads)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 compiler flag")
def test_an_avx2_build_computes_the_reference_to_the_bit(monkeypatch):
    """Built as for an AVX2-only CPU ($MONAI_QSA_KERNEL_CFLAGS=-mno-avx512f), every path it has gives the reference's
    output: the builds an AVX2-only CPU makes are tested on AVX-512 machines too."""
    names = (
        "image larger (replicated)",
        "stride 2, 8 refined, 3 out",
        "3D more planes than an item, cropped and replicated",
    )
    problems = [_problem(**PROBLEMS[name]) for name in names]
    monkeypatch.setenv(CFLAGS_VARIABLE, "-mno-avx512f")
    _library.cache_clear()
    try:
        paths = [path for path in int8_attention_paths() if path != "torch"]
        assert {"avx2", "scalar"} <= set(paths)  # it was built (the machines this project runs on have AVX2)
        for path in paths:
            monkeypatch.setenv(PATH_VARIABLE, path)
            for problem in problems:
                assert torch.equal(RESTORE(*problem), restore_head_int8_reference(*problem)), path
    finally:
        _library.cache_clear()


@pytest.mark.parametrize("dims", [2, 3])
def test_reference_is_the_int8_graph_function(dims):
    """Quantise, 3x3(x3) convolution of the dequantised codes + ReLU, requantise, 1x1(x1) convolution: what the int8
    program computed before the fusion, up to the order of fp32 sums (at most one code of the refinement apart)."""
    low, size, crop = (
        ((20, 20), (78, 77), [0, -3, 0, -2]) if dims == 2 else ((5, 9, 9), (9, 17, 19), [0, 1, 0, -1, 0, -1])
    )
    features, image, stride, in_scale, in_zp, rw, rs, rb, mid_scale, mid_zp, hw, hs, hb = _problem(
        stride=4 if dims == 2 else 2, low=low, size=size
    )
    image = torch.nan_to_num(image)  # fake_quantize_per_tensor_affine keeps NaN
    shuffled = (
        F.pixel_shuffle(features, stride) if dims == 2 else torch.ops.monai_qsa.pixel_shuffle_3d(features, stride)
    )
    upsampled = F.pad(shuffled, crop, mode="replicate")  # crop or replicate at the far borders to the image size
    x = torch.cat([upsampled, image], 1)
    x = torch.fake_quantize_per_tensor_affine(x, in_scale, in_zp, 0, 255)
    conv = F.conv2d if dims == 2 else F.conv3d
    per_channel = (-1,) + (1,) * (dims + 1)
    refined = F.relu(conv(x, rw.float() * rs.view(per_channel), rb, padding=1))
    refined = torch.fake_quantize_per_tensor_affine(refined, mid_scale, mid_zp, 0, 255)
    expected = conv(refined, hw.float() * hs.view(per_channel), hb)
    fused = RESTORE(features, image, stride, in_scale, in_zp, rw, rs, rb, mid_scale, mid_zp, hw, hs, hb)
    one_code = mid_scale * (hw.float().abs().flatten(1).sum(1) * hs).max()
    assert (fused - expected).abs().max() <= one_code
    assert (fused - expected).abs().mean() < 1e-3 * one_code  # and almost everywhere the same


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p[:5] + (p[5].float(),) + p[6:], "refine_weight must be a dense torch.int8"),
        (lambda p: p[:5] + (p[5][:, :3],) + p[6:], "refine_weight must be (mid, 5, 3, 3)"),
        (
            lambda p: _problem(low=(2, 3, 4), size=(4, 6, 8), stride=2)[:5] + p[5:],
            "refine_weight must be (mid, 5, 3, 3, 3)",
        ),
        (lambda p: p[:2] + (3,) + p[3:], "stride must be an integer from 1 to 64"),
        (lambda p: p[:2] + (2**32,) + p[3:], "stride must be an integer from 1 to 64"),
        (lambda p: (p[0][:, :0],) + p[1:], "features must have at least one channel and position"),
        (lambda p: p[:3] + (0.0,) + p[4:], "in_scale must be positive and finite"),
        (lambda p: p[:9] + (300,) + p[10:], "mid_zero_point must be a uint8 code"),
        (lambda p: p[:10] + (p[10][:, :2],) + p[11:], "head_weight must be (out_channels, 4, 1, 1)"),
        (lambda p: p[:1] + (p[1][:1],) + p[2:], "features and image must be (B, C, H, W) or (B, C, D, H, W) of one"),
        (lambda p: p[:1] + (p[1][:, :, None],) + p[2:], "features and image must be (B, C, H, W) or (B, C, D, H, W)"),
        (lambda p: (p[0][:, :, :0],) + p[1:], "features must have at least one channel and position"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    with pytest.raises(ValueError, match="restore_head_int8") as error:
        RESTORE(*change(_problem()))
    assert message in str(error.value)


@pytest.mark.parametrize("path", ["auto", "torch"])  # the C kernel checks the scales' values, the reference in Python
@pytest.mark.parametrize("index, name", [(6, "refine_weight_scale"), (11, "head_weight_scale")])
def test_weight_scales_must_be_positive_and_finite(path, index, name, monkeypatch):
    monkeypatch.setenv(PATH_VARIABLE, path)
    problem = list(_problem())
    for bad in (0.0, float("inf"), float("nan")):
        problem[index] = problem[index].clone()
        problem[index][-1] = bad
        with pytest.raises(ValueError, match=f"restore_head_int8: {name} must hold positive finite scales"):
            RESTORE(*problem)


def test_more_refined_channels_than_the_kernel_holds_are_refused():
    with pytest.raises(ValueError, match="17 output channels; the kernel takes 1 to 16"):
        RESTORE(*_problem(mid=17))


def test_more_input_channels_than_int32_sums_hold_are_refused():
    # 27 taps x 255 x 128 per input channel in 3D: 2048 channels at most (4096 in 2D)
    with pytest.raises(ValueError, match="the 3D refinement takes at most 2048 input channels, got 2049"):
        RESTORE(*_problem(batch=1, channels=2048, stride=1, low=(2, 2, 3), size=(2, 2, 3)))


@pytest.fixture(scope="module")
def nano():
    """A 2D ``s4_light_nano`` SAUNet (random weights, batch norms with non-trivial statistics) and batches."""
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, preset="s4_light_nano")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval(), [torch.randn(2, 1, 48, 40) for _ in range(3)]


def test_int8_programs_of_saunets_with_a_strided_stem_use_it(nano, tmp_path):
    net, batches = nano
    fused = quantize_ptq(net, batches, batches[0])
    unfused = quantize_ptq(net, batches, batches[0], fuse_restore_head=False)
    nodes = [n for n in fused.program.graph.nodes if n.target is RESTORE.default]
    assert len(nodes) == 1
    assert not [n for n in fused.program.graph.nodes if n.target is torch.ops.aten.pixel_shuffle.default]
    assert [n for n in unfused.program.graph.nodes if n.target is torch.ops.aten.pixel_shuffle.default]
    x = torch.randn(1, 1, 45, 61)  # image sizes that are no multiple of the stem's stride
    with torch.no_grad():
        out, reference = fused(x), unfused(x)
    assert out.shape == (1, 2, 45, 61)
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (out - reference).abs().mean() <= 1e-3 * reference.abs().mean()
    assert count_flops(fused, x) == pytest.approx(count_flops(unfused, x), rel=0.05)
    # the artifact stores the operator and computes the same after loading
    path = save_quantized(tmp_path / "nano_int8.pt2", fused, batches[0])
    loaded = load_quantized(path)
    assert [n for n in loaded.program.graph.nodes if n.target is RESTORE.default]
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_restores_the_operator_does_not_take_stay_unfused():
    """More than 16 refined channels (a first level of 68 features): the program keeps its separate operators."""
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(68, 136), kernel_size=3, num_heads=4, stem_stride=4, decoder="light").eval()
    batches = [torch.randn(1, 1, 32, 32) for _ in range(2)]
    qmodel = quantize_ptq(net, batches, batches[0])
    assert not [n for n in qmodel.program.graph.nodes if n.target is RESTORE.default]
    with torch.no_grad():
        assert qmodel(batches[0]).shape == (1, 2, 32, 32)


def test_int8_3d_programs_use_it_where_their_convolutions_compute_in_int8(tmp_path):
    torch.manual_seed(0)
    net = SAUNet(3, 1, 2, preset="s2_light", features=(8, 16, 16, 32), kernel_size=3, num_heads=2).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    batches = [torch.randn(1, 1, 16, 16, 16) for _ in range(2)]
    fused = quantize_ptq(net, batches, batches[0], int8_conv3d=True)
    unfused = quantize_ptq(net, batches, batches[0], int8_conv3d=True, fuse_restore_head=False)
    assert len([n for n in fused.program.graph.nodes if n.target is RESTORE.default]) == 1
    assert not [n for n in fused.program.graph.nodes if n.target is torch.ops.monai_qsa.pixel_shuffle_3d.default]
    x = torch.randn(1, 1, 15, 13, 11)  # sizes that are no multiple of the stem's stride
    with torch.no_grad():
        out, reference = fused(x), unfused(x)
    assert out.shape == (1, 2, 15, 13, 11)
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (out - reference).abs().mean() <= 1e-3 * reference.abs().mean()
    path = save_quantized(tmp_path / "s2_light_int8.pt2", fused, batches[0])
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(x), out)
    # computed in fp32 from int8 weights (int8_conv3d=False), the refinement is no int8 convolution: left alone
    weight_only = quantize_ptq(net, batches, batches[0])
    assert not [n for n in weight_only.program.graph.nodes if n.target is RESTORE.default]
