import itertools
import math

import pytest
import torch

from monai_qsa.networks.blocks import StandAloneSelfAttention


def reference_sasa(layer: StandAloneSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct SASA: explicit loops over batch, heads, positions and offsets."""
    dims, ksize, dil, heads, d = (
        layer.spatial_dims,
        layer.kernel_size,
        layer.dilation,
        layer.num_heads,
        layer.head_channels,
    )
    qkv = torch.nn.functional.conv1d(x.flatten(2), layer.qkv.weight.flatten(1).unsqueeze(-1), layer.qkv.bias).reshape(
        (x.shape[0], 3 * layer.out_channels) + tuple(x.shape[2:])
    )
    q, k, v = qkv.split(layer.out_channels, dim=1)
    spatial = tuple(x.shape[2:])
    out = torch.zeros((x.shape[0], layer.out_channels) + spatial, dtype=torch.float64)
    half = ksize // 2
    for b, h in itertools.product(range(x.shape[0]), range(heads)):
        channels = slice(h * d, (h + 1) * d)
        for pos in itertools.product(*[range(s) for s in spatial]):
            logits, values = [], []
            for offset in itertools.product(range(ksize), repeat=dims):
                nb = tuple(p + (o - half) * dil for p, o in zip(pos, offset))
                if not all(0 <= n < s for n, s in zip(nb, spatial)):
                    continue  # outside the image: not attended to
                rel = torch.cat([layer.rel_pos[a][offset[a]] for a in range(dims)])  # concat of per-axis embeddings
                qv = q[(b, channels) + pos].double()
                logits.append((qv @ (k[(b, channels) + nb].double() + rel.double())) / math.sqrt(d))
                values.append(v[(b, channels) + nb].double())
            weights = torch.softmax(torch.stack(logits), dim=0)
            out[(b, channels) + pos] = (weights[:, None] * torch.stack(values)).sum(0)
    if layer.stride > 1:
        pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
        out = pool(out, layer.stride, layer.stride)
    return out.float()


CASES = [
    # dims, in, out, kernel, heads, stride, dilation, spatial
    (2, 3, 8, 3, 2, 1, 1, (5, 6)),
    (2, 4, 12, 5, 3, 1, 1, (6, 7)),
    (2, 4, 8, 7, 1, 2, 1, (6, 8)),
    (2, 2, 8, 3, 4, 1, 2, (7, 6)),
    (3, 2, 6, 3, 2, 1, 1, (3, 4, 5)),
    (3, 3, 12, 5, 4, 2, 1, (4, 4, 6)),
]


@pytest.mark.parametrize("dims,cin,cout,ksize,heads,stride,dil,spatial", CASES)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_reference(dims, cin, cout, ksize, heads, stride, dil, spatial, qkv_bias):
    layer = StandAloneSelfAttention(dims, cin, cout, ksize, heads, stride=stride, dilation=dil, qkv_bias=qkv_bias)
    with torch.no_grad():
        for p in layer.rel_pos:
            p.normal_()  # make the relative term matter
    x = torch.randn((2, cin) + spatial)
    expected = reference_sasa(layer, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dims,cin,cout,ksize,heads,stride,dil,spatial", [CASES[1], CASES[3], CASES[5]])
def test_traced_path_equals_eager(dims, cin, cout, ksize, heads, stride, dil, spatial):
    layer = StandAloneSelfAttention(dims, cin, cout, ksize, heads, stride=stride, dilation=dil).eval()
    x = torch.randn((1, cin) + spatial)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x), atol=1e-5, rtol=1e-4)
    out, attn = torch.export.export(layer, (x,), kwargs={"return_attention": True}).module()(x, return_attention=True)
    eager_out, eager_attn = layer(x, return_attention=True)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn, eager_attn, atol=1e-6, rtol=1e-5)


def test_torch_compile_matches_eager():
    layer = StandAloneSelfAttention(2, 4, 8, 5, 2).eval()
    x = torch.randn(1, 4, 9, 11)
    compiled = torch.compile(layer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_weights(dims):
    layer = StandAloneSelfAttention(dims, 3, 8, 3, 2)
    spatial = (5, 6) if dims == 2 else (4, 5, 3)
    out, attn = layer(torch.randn((2, 3) + spatial), return_attention=True)
    assert attn.shape == (2, 2, 3**dims) + spatial
    torch.testing.assert_close(attn.sum(2), torch.ones((2, 2) + spatial))
    # the corner position has no neighbours on the negative side: those offsets get exactly zero weight
    corner = attn[(0, 0, slice(None)) + (0,) * dims]
    assert corner[0] == 0 and corner[(3**dims) // 2] > 0


@pytest.mark.parametrize("dims,ksize,dil", [(2, 3, 1), (2, 5, 2), (3, 3, 1)])
def test_locality(dims, ksize, dil):
    layer = StandAloneSelfAttention(dims, 2, 6, ksize, 2, dilation=dil)
    spatial = (11, 12) if dims == 2 else (7, 8, 7)
    x = torch.randn((1, 2) + spatial, requires_grad=True)
    p = tuple(s // 2 for s in spatial)
    layer(x)[(0, slice(None)) + p].sum().backward()
    touched = x.grad.abs().sum(1)[0] > 0
    reach = dil * (ksize // 2)
    window = torch.zeros_like(touched)
    window[tuple(slice(c - reach, c + reach + 1, dil) for c in p)] = True
    assert touched[window].all() and not touched[~window].any()


@pytest.mark.parametrize("dims", [2, 3])
def test_translation_equivariance(dims):
    layer = StandAloneSelfAttention(dims, 2, 6, 3, 2)
    spatial = (12, 12) if dims == 2 else (8, 8, 8)
    x = torch.randn((1, 2) + spatial)
    shifted = torch.roll(x, shifts=2, dims=2)
    y, y_shifted = layer(x), layer(shifted)
    inner = (Ellipsis, slice(4, -4)) + (slice(2, -2),) * (dims - 1)
    inner_src = (Ellipsis, slice(2, -6)) + (slice(2, -2),) * (dims - 1)
    torch.testing.assert_close(y_shifted[inner], y[inner_src], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"num_heads": 3}, "num_heads"),
        ({"spatial_dims": 3, "num_heads": 4}, "num_heads"),
        ({"stride": 0}, "stride"),
        ({"dilation": 0}, "dilation"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"spatial_dims": 2, "in_channels": 4, "out_channels": 8, "kernel_size": 3, "num_heads": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        StandAloneSelfAttention(**args)


def test_wrong_input_rank():
    layer = StandAloneSelfAttention(3, 2, 6, 3, 2)
    with pytest.raises(ValueError, match="5 dimensions"):
        layer(torch.randn(1, 2, 8, 8))


def test_mixed_precision_autocast_matches_fp32():
    """Under autocast (the bundles' --amp on CUDA; bf16 on this CPU) the layer runs, trains and stays close to fp32."""
    layer = StandAloneSelfAttention(2, 8, 8, kernel_size=3, num_heads=2)
    x = torch.randn(1, 8, 12, 12, requires_grad=True)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), reference, atol=0.05, rtol=0.05)
    mixed.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
