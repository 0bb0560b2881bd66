import pytest
import torch
from monai.bundle import ConfigParser

from monai_qsa.networks import SAResNet, SAUNet, StandAloneSelfAttention
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size

UNET_CASES = [
    (2, (1, 1, 32, 28), dict(features=(8, 16, 32), num_heads=2)),
    (3, (1, 2, 12, 10, 9), dict(features=(6, 12), num_heads=2, kernel_size=3)),
]
RESNET_CASES = [
    (2, (2, 1, 32, 32), dict(block_inplanes=(8, 16, 16, 32), num_heads=2)),
    (3, (2, 1, 16, 16, 16), dict(layers=(1, 1), block_inplanes=(6, 12), num_heads=2, kernel_size=3)),
]


@pytest.mark.parametrize("dims,shape,kwargs", UNET_CASES)
def test_saunet_forward_backward_export(dims, shape, kwargs):
    net = SAUNet(dims, shape[1], 3, **kwargs)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 3) + shape[2:]
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x), atol=1e-4, rtol=1e-4)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("dims,shape,kwargs", RESNET_CASES)
def test_saresnet_forward_backward_export(dims, shape, kwargs):
    net = SAResNet(dims, shape[1], 5, **kwargs)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 5)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x), atol=1e-4, rtol=1e-4)


def test_saresnet_presets_and_every_spatial_conv_is_attention():
    net = SAResNet(2, 1, 2, layers="sa26")
    blocks = [m for m in net.modules() if m.__class__.__name__ == "SABottleneck"]
    assert len(blocks) == 8  # 8 bottlenecks x 3 layers + stem + classifier = 26 layers
    spatial_convs = [m for m in net.stages.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert not spatial_convs
    assert sum(isinstance(m, StandAloneSelfAttention) for m in net.modules()) == 8
    with pytest.raises(ValueError, match="preset"):
        SAResNet(2, 1, 2, layers="sa999")


def test_networks_from_bundle_config():
    config = {
        "unet": {
            "_target_": "monai_qsa.networks.nets.SAUNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 2,
            "features": [8, 16],
            "num_heads": 2,
        },
        "resnet": {
            "_target_": "monai_qsa.networks.nets.SAResNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "num_classes": 3,
            "layers": [1, 1],
            "block_inplanes": [8, 16],
            "num_heads": 2,
        },
    }
    parser = ConfigParser(config)
    assert isinstance(parser.get_parsed_content("unet"), SAUNet)
    assert isinstance(parser.get_parsed_content("resnet"), SAResNet)


def test_complexity_counts():
    layer = StandAloneSelfAttention(2, 16, 16, kernel_size=7, num_heads=4)
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, bias=False)
    x = torch.randn(1, 16, 20, 20)
    positions = 20 * 20
    rel_macs = 2 * positions * 4 * 7 * 2  # 2 axes x heads x k x (d_head / 2 channels per axis)
    expected = positions * 16 * 48 + 2 * positions * 16 * 49 + rel_macs
    assert count_flops(layer, x) == expected
    assert count_flops(conv, x) == positions * 16 * 16 * 49
    assert count_parameters(layer) == 16 * 48 + 2 * 7 * 2
    assert serialized_size(layer) > 4 * count_parameters(layer)


def test_serialized_size_of_path(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 123)
    assert serialized_size(path) == 123
    with pytest.raises(TypeError, match="model_or_path"):
        serialized_size(3)
