import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from monai_qsa.networks.blocks import SAUnit
from monai_qsa.networks.blocks.pixel_shuffle import pixel_shuffle_3d, pixel_unshuffle_3d
from monai_qsa.networks.nets import SAUNET_PRESETS, SAUNet
from monai_qsa.networks.nets.sa_unet import LightUp, PixelShuffleUpsample, ResolutionRestore, SAUpCat
from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized
from monai_qsa.utils.complexity import count_flops

BEFORE_DESIGN_SPACE = "96ee39e"
"""The last commit of the original SAUNet, which the default design must reproduce."""
CHEAP_PRESETS = [name for name in SAUNET_PRESETS if name != "classic"]
#: 3D networks use 3x3x3 neighbourhoods, as the sa_seg3d bundle does
OVERRIDES = {2: {}, 3: {"kernel_size": 3}}


@pytest.fixture(scope="module")
def committed_saunet(tmp_path_factory):
    """``SAUNet`` as committed before the design space (commit 96ee39e), imported from ``git show``."""
    path = tmp_path_factory.mktemp("committed") / "committed_sa_unet.py"
    source = subprocess.run(
        ["git", "show", f"{BEFORE_DESIGN_SPACE}:monai_qsa/networks/nets/sa_unet.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("committed_sa_unet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module.SAUNet
    del sys.modules[spec.name]


def _levels(preset: str) -> int:
    return len(SAUNET_PRESETS[preset]["features"])


@pytest.mark.parametrize("dims,shape,kwargs", [(2, (2, 1, 33, 30), {}), (3, (1, 2, 11, 12, 9), {"kernel_size": 3})])
def test_default_unchanged(committed_saunet, dims, shape, kwargs):
    """The default design computes the original network's function, and the original's checkpoints load into it."""
    committed = committed_saunet(dims, shape[1], 3, **kwargs).eval()
    for net in (SAUNet(dims, shape[1], 3, **kwargs), SAUNet(dims, shape[1], 3, preset="classic", **kwargs)):
        net.load_state_dict(committed.state_dict())
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), committed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride", [2, 4])
def test_pixel_shuffle_upsample_is_a_transposed_convolution(stride, dims):
    """The same function, initialised by the same random draws (so networks train as they did), and the transposed
    convolution's checkpoints load."""
    x = torch.randn((2, 6, 7, 5, 3)[: dims + 2])
    torch.manual_seed(5)
    transposed = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2](6, 5, kernel_size=stride, stride=stride)
    next_draw = torch.rand(1)
    torch.manual_seed(5)
    upsample = PixelShuffleUpsample(6, 5, stride, spatial_dims=dims)
    assert torch.equal(torch.rand(1), next_draw)
    with torch.no_grad():
        torch.testing.assert_close(upsample(x), transposed(x), rtol=1e-5, atol=1e-6)
    upsample = PixelShuffleUpsample(6, 5, stride, spatial_dims=dims)
    upsample.load_state_dict(transposed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(upsample(x), transposed(x), rtol=1e-5, atol=1e-6)


def test_pixel_shuffle_3d_places_each_channel_in_its_cell_and_has_a_gradient():
    x = torch.randn(2, 2 * 8, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    out = pixel_shuffle_3d(x, 2)
    assert out.shape == (2, 2, 6, 2, 4)
    for i, j, k in itertools.product(range(2), repeat=3):  # channel c * 8 + (i * 2 + j) * 2 + k -> offset (i, j, k)
        torch.testing.assert_close(out[:, :, i::2, j::2, k::2], x[:, (i * 2 + j) * 2 + k :: 8])
    torch.testing.assert_close(pixel_unshuffle_3d(out, 2), x)
    assert torch.autograd.gradcheck(lambda t: pixel_shuffle_3d(t, 2), (x,))
    with pytest.raises(ValueError, match="divisible by 8"):
        pixel_shuffle_3d(torch.zeros(1, 12, 2, 2, 2), 2)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        pixel_shuffle_3d(torch.zeros(1, 8, 2, 2, 2), 0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("preset", list(SAUNET_PRESETS))
def test_preset_shapes(preset, dims):
    net = SAUNet(dims, 1, 3, preset=preset, **OVERRIDES[dims]).eval()
    # even and odd sizes, down to the smallest the classic network accepts (2 ** (levels - 1))
    sizes = [(16,) * dims, (17, 15, 13)[:dims], (2 ** (_levels(preset) - 1),) * dims, (9, 11, 10)[:dims]]
    with torch.no_grad():
        for size in sizes:
            assert net(torch.randn((2, 1) + size)).shape == (2, 3) + size


@pytest.mark.parametrize(
    "stem_stride,decoder,stage_types",
    itertools.product((1, 2, 4), ("full", "light"), ("sa", "conv", ("conv", "sa", "sa"), ("sa", "sa", "conv"))),
)
def test_design_combinations_2d(stem_stride, decoder, stage_types):
    net = SAUNet(
        2,
        2,
        3,
        features=(8, 16, 32),
        kernel_size=(3, 5, 3),
        num_heads=2,
        stem_stride=stem_stride,
        stage_types=stage_types,
        decoder=decoder,
    )
    x = torch.randn(2, 2, 13, 10)
    y = net(x)
    assert y.shape == (2, 3, 13, 10)
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert any(isinstance(m, SAUnit) for m in net.modules()) == (stage_types != "conv")
    assert all(isinstance(m, SAUpCat if decoder == "full" else LightUp) for m in net.decoder)
    assert isinstance(net.restore, ResolutionRestore) == (stem_stride > 1)
    assert count_flops(net.eval(), x) > 0


@pytest.mark.parametrize("stem_stride,decoder", [(2, "light"), (4, "full"), (1, "light")])
def test_design_combinations_3d(stem_stride, decoder):
    net = SAUNet(
        3,
        1,
        2,
        features=(6, 12, 24),
        kernel_size=3,
        num_heads=2,
        stem_stride=stem_stride,
        stage_types=("conv", "sa", "sa"),
        decoder=decoder,
    )
    x = torch.randn(2, 1, 9, 12, 7)
    y = net(x)
    assert y.shape == (2, 2, 9, 12, 7)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("preset", list(SAUNET_PRESETS))
def test_export_dynamic_and_static(preset):
    net = SAUNet(2, 1, 2, preset=preset).eval()
    # dynamic shapes from the size whose coarsest level has 2 pixels (the exporter assumes sizes of 2 or more):
    # pooling rounds down after a stride-1 stem, up after a strided one
    stride, coarsest = SAUNET_PRESETS[preset]["stem_stride"], 2 ** (_levels(preset) - 1)
    smallest = 2 * coarsest if stride == 1 else stride * coarsest + 1
    height, width = (torch.export.Dim(name, min=smallest, max=512) for name in ("height", "width"))
    exported = torch.export.export(
        net, (torch.randn(2, 1, 40, 40),), dynamic_shapes=({0: torch.export.Dim("batch"), 2: height, 3: width},)
    )
    with torch.no_grad():
        for shape in [(3, 1, smallest, smallest + 1), (1, 1, 64, 64)]:
            x = torch.randn(shape)
            torch.testing.assert_close(exported.module()(x), net(x), atol=1e-4, rtol=1e-4)
        # smaller sizes: one static export per size
        x = torch.randn(1, 1, 9, 8)
        torch.testing.assert_close(torch.export.export(net, (x,)).module()(x), net(x), atol=1e-4, rtol=1e-4)


def test_export_dynamic_3d():
    net = SAUNet(3, 1, 2, preset="s4_light", features=(8, 16, 32), kernel_size=3, num_heads=2).eval()
    size = torch.export.Dim("size", min=17, max=128)
    exported = torch.export.export(net, (torch.randn(1, 1, 24, 24, 24),), dynamic_shapes=({2: size, 3: size, 4: size},))
    with torch.no_grad():
        for side in (17, 32):
            x = torch.randn(1, 1, side, side, side)
            torch.testing.assert_close(exported.module()(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "dims,preset,kwargs,shape",
    [
        (2, "s4_light_small", {}, (2, 1, 33, 32)),
        (
            3,
            "s2_conv1_light",
            {"kernel_size": 3, "features": (8, 16, 32), "stage_types": ("conv", "sa", "sa")},
            (2, 1, 17, 16, 15),
        ),
    ],
)
def test_quantize_save_load(tmp_path, dims, preset, kwargs, shape):
    net = SAUNet(dims, 1, 2, preset=preset, num_heads=2, **kwargs).eval()
    x = torch.randn(shape)
    qmodel = quantize_ptq(net, [x, torch.randn_like(x)], x)
    loaded = load_quantized(save_quantized(tmp_path / "model_int8.pt2", qmodel, x))
    with torch.no_grad():
        reference, quantized = net(x), qmodel(x)
        torch.testing.assert_close(loaded(x), quantized)
        # int8 weights (per channel) and activations (per tensor, calibrated on these inputs) round each layer's
        # output to about 1/255 of its range; through ~12 layers that stays below 5% of the output (the bound the
        # 3D test of test_quantization.py uses); float arithmetic alone would be below 1e-5
        assert (quantized - reference).norm() / reference.norm() < 0.05
        assert (quantized - reference).abs().max() > 0


@pytest.mark.parametrize("dims,size", [(2, 64), (3, 32)])
def test_cheap_presets_cost_less_than_classic(dims, size):
    x = torch.randn((1, 1) + (size,) * dims)
    classic = count_flops(SAUNet(dims, 1, 2, preset="classic", **OVERRIDES[dims]).eval(), x)
    for preset in CHEAP_PRESETS:
        assert count_flops(SAUNet(dims, 1, 2, preset=preset, **OVERRIDES[dims]).eval(), x) < classic, preset


def test_arguments_override_preset_and_bundle_config():
    net = SAUNet(2, 1, 2, preset="s2_light", decoder="full", features=(8, 16, 32), num_heads=2)
    assert net.stem_stride == 2 and net.decoder_type == "full" and len(net.encoder) == 3
    assert all(isinstance(m, SAUpCat) for m in net.decoder)
    config = {
        "network_def": {
            "_target_": "monai_qsa.networks.nets.SAUNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "preset": "s2_conv1_light",
            "features": [8, 16, 32, 64],
            "kernel_size": [3, 3, 3, 3],
            "num_heads": 2,
        }
    }
    net = ConfigParser(config).get_parsed_content("network_def")
    assert net.stage_types == ("conv", "sa", "sa", "sa") and net.stem_stride == 2
    assert net.encoder[0][0].conv.kernel_size == (3, 3, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preset": "tiny"}, "preset must be one of .*classic.*s2_light"),
        ({"stem_stride": 3}, "stem_stride"),
        ({"decoder": "heavy"}, "decoder"),
        ({"stage_types": ("sa", "conv")}, "stage_types needs one value or one entry per level"),
        ({"stage_types": "mlp"}, "stage_types entries"),
        ({"kernel_size": 4}, "kernel_size entries"),
        ({"kernel_size": (3, 5, 7)}, "kernel_size needs"),
        ({"features": (16,)}, "features"),
        ({"num_heads": 0}, "num_heads"),
        ({"features": (16, 32, 64, 126)}, "divisible by num_heads"),
        ({"preset": "s2_conv1_light", "features": (8, 16, 32)}, "kernel_size needs .*pass it explicitly"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAUNet(2, 1, 2, **kwargs)


def test_conv_levels_need_no_heads_divisibility():
    net = SAUNet(2, 1, 2, features=(6, 32), num_heads=4, stage_types=("conv", "sa"))
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)
