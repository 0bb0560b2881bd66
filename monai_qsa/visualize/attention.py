"""Where an SA network looked: per-position statistics of SASA attention, mapped back to the input's grid.

Every position of a :class:`StandAloneSelfAttention` layer spreads one unit of attention (per head) over the
neighbours of its ``k^d`` window that lie inside the image (the layer masks the others out of its softmax). From
those weights, ``(B, heads, k^d, *S)``, three maps are derived, each averaged over heads:

- **attention received**: the attention each position gets from the neighbours that see it, divided by what it
  would get if every position attended uniformly to its valid neighbours. 1 everywhere for uniform attention, so
  a position near the border, seen by fewer neighbours, is not darker for that reason; above 1: looked at more
  than a uniform layer would.
- **entropy**: how spread each position's attention is, divided by its largest possible value ``log(n)`` for the
  ``n`` valid neighbours of that position: 0 = one neighbour, 1 = uniform.
- **mean distance**: expected distance, in voxels of that layer, to the attended neighbours.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_qsa.networks.blocks.sasa import StandAloneSelfAttention

__all__ = [
    "ATTENTION_STATISTICS",
    "attention_layers",
    "default_layers",
    "attention_statistics",
    "attention_maps",
    "upsample_to_grid",
]

ATTENTION_STATISTICS = ("attention_received", "attention_entropy", "attention_distance")


def attention_layers(network: nn.Module) -> dict[str, StandAloneSelfAttention]:
    """The SASA layers of ``network`` by module name, in forward order of definition."""
    return {name: m for name, m in network.named_modules() if isinstance(m, StandAloneSelfAttention)}


def default_layers(network: nn.Module) -> list[str]:
    """The last SASA layer of the encoder and the last of the first decoder block (SAUNet), or the last SASA layer
    (SAResNet and other networks without that split).

    The first decoder layer is not the default: its input is a stride-2 transposed convolution's output, whose
    2-periodic (checkerboard) pattern its attention inherits; one layer further the pattern has faded.
    """
    names = list(attention_layers(network))
    if not names:
        raise ValueError(f"{type(network).__name__} has no StandAloneSelfAttention layer to take attention maps from.")
    encoder = [n for n in names if n.startswith("encoder")]
    first_decoder_block = [n for n in names if n.startswith("decoder.0.")]
    return [encoder[-1], first_decoder_block[-1]] if encoder and first_decoder_block else [names[-1]]


def _offsets(layer: StandAloneSelfAttention) -> list[tuple[int, ...]]:
    """Neighbour offsets in the order of the attention's ``k^d`` axis (row-major over the window)."""
    half = layer.kernel_size // 2
    steps = [layer.dilation * (i - half) for i in range(layer.kernel_size)]
    return list(itertools.product(steps, repeat=layer.spatial_dims))


def _shifted(values: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``out[p] = values[p - offset]`` on the last ``len(offset)`` axes, zero where ``p - offset`` is outside."""
    out = torch.zeros_like(values)
    dims = len(offset)
    source, target = [slice(None)] * (values.ndim - dims), [slice(None)] * (values.ndim - dims)
    for o, size in zip(offset, values.shape[-dims:]):  # empty slices where |o| >= size (maps smaller than k)
        source.append(slice(max(0, -o), max(0, size - max(0, o))))
        target.append(slice(max(0, o), max(0, size - max(0, -o))))
    out[tuple(target)] = values[tuple(source)]
    return out


def _received(attention: torch.Tensor, offsets: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``(..., k^d, *S) -> (..., *S)``: position ``q`` gives ``a[q, o]`` to ``q + o``, so ``p`` receives
    ``a[p - o, o]`` from each neighbour ``p - o`` that sees it."""
    window_axis = -1 - len(offsets[0])
    return sum(_shifted(attention.select(window_axis, i), o) for i, o in enumerate(offsets))


def _valid_neighbours(offsets: Sequence[tuple[int, ...]], spatial: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(k^d, *S)``: 1 where neighbour ``q + o`` of position ``q`` is inside the image, else 0."""
    ones = torch.ones(tuple(spatial), dtype=like.dtype, device=like.device)
    return torch.stack([_shifted(ones, [-c for c in o]) for o in offsets])


def attention_statistics(attention: torch.Tensor, layer: StandAloneSelfAttention) -> dict[str, torch.Tensor]:
    """The three maps of one layer, each ``(B, 1, *S)`` at the layer's resolution (see the module docstring).

    Args:
        attention: the layer's weights ``(B, heads, k^d, *S)`` (``layer(x, return_attention=True)[1]``).
        layer: the layer that produced them.
    """
    offsets = _offsets(layer)
    valid = _valid_neighbours(offsets, attention.shape[3:], attention)
    count = valid.sum(0)
    uniform_received = _received(valid / count, offsets)
    received = _received(attention, offsets).mean(1, keepdim=True) / uniform_received
    # a position with a single valid neighbour (kernel_size 1) has no choice: entropy 0 of at most 0
    entropy = -(attention * attention.clamp_min(1e-12).log()).sum(2) / count.log().clamp_min(1e-12)
    lengths = torch.tensor([math.sqrt(sum(c * c for c in o)) for o in offsets], dtype=attention.dtype)
    distance = (attention * lengths.reshape((1, 1, -1) + (1,) * layer.spatial_dims)).sum(2)
    return {
        "attention_received": received,
        "attention_entropy": entropy.mean(1, keepdim=True),
        "attention_distance": distance.mean(1, keepdim=True),
    }


def upsample_to_grid(values: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """A ``(B, C, *s)`` map of a layer that sees the image at ``1/f`` of its resolution (``f`` a power of 2 per axis,
    as after pooling), linearly upsampled to the image grid ``(B, C, *spatial_size)``.

    Layer position ``i`` covers image positions ``f*i ... f*i + f - 1``, so it is placed at their centre (an upsampling
    by exactly ``f`` with ``align_corners=False``), not stretched over the whole image; image positions that pooling
    left out (odd sizes) repeat the last value, and positions beyond the image (padding) are cropped.
    """
    size = tuple(int(s) for s in spatial_size)
    factors = [2 ** max(0, round(math.log2(full / part))) for full, part in zip(size, values.shape[2:])]
    if any(f > 1 for f in factors):
        mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
        values = F.interpolate(values, scale_factor=factors, mode=mode, align_corners=False)
    values = values[(slice(None), slice(None), *(slice(0, s) for s in size))]
    missing = [full - part for full, part in zip(reversed(size), reversed(values.shape[2:]))]
    return F.pad(values, [p for m in missing for p in (0, m)], mode="replicate") if any(missing) else values


@contextlib.contextmanager
def _capture_inputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, m in layers.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(
    network: nn.Module, image: torch.Tensor, layers: Sequence[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Attention statistics of chosen SASA layers for ``image``, upsampled to the image's grid.

    The network runs once unchanged (its output is not affected); each chosen layer's input is captured and the
    layer is re-run with ``return_attention=True``. Nothing is computed when this function is not called.

    Args:
        network: an fp32 SA network (e.g. SAUNet, SAResNet) in eval mode.
        image: network input ``(B, C, *S)``.
        layers: module names of SASA layers (see :func:`attention_layers`); default :func:`default_layers`.

    Returns:
        ``{layer name: {statistic: (B, 1, *S) tensor}}`` with the statistics of :data:`ATTENTION_STATISTICS`.
    """
    available = attention_layers(network)
    chosen = list(layers) if layers is not None else default_layers(network)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"not SASA layers of {type(network).__name__}: {unknown}; available: {list(available)}.")
    maps = {}
    with torch.no_grad(), _capture_inputs({name: available[name] for name in chosen}) as inputs:
        network(image)
        for name in chosen:
            _, attention = available[name](inputs[name], return_attention=True)
            maps[name] = {
                key: upsample_to_grid(value, image.shape[2:])
                for key, value in attention_statistics(attention, available[name]).items()
            }
    return maps
