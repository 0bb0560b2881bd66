"""Where an SA network looked: per-position statistics of SASA attention, mapped back to the input's resolution.

Every position of a :class:`StandAloneSelfAttention` layer spreads one unit of attention (per head) over its
``k^d`` neighbours. From those weights, ``(B, heads, k^d, *S)``, three maps are derived:

- **attention received**: how much attention each position gets from the neighbours that see it, summed over heads
  (1 per head on average; higher where the network looks),
- **entropy**: how spread each position's attention is (0 = one neighbour, ``log k^d`` = uniform), mean over heads,
- **mean distance**: expected distance (in voxels of that layer) to the attended neighbours, mean over heads.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_qsa.networks.blocks.sasa import StandAloneSelfAttention

__all__ = ["ATTENTION_STATISTICS", "attention_layers", "default_layers", "attention_statistics", "attention_maps"]

ATTENTION_STATISTICS = ("attention_received", "attention_entropy", "attention_distance")


def attention_layers(network: nn.Module) -> dict[str, StandAloneSelfAttention]:
    """The SASA layers of ``network`` by module name, in forward order of definition."""
    return {name: m for name, m in network.named_modules() if isinstance(m, StandAloneSelfAttention)}


def default_layers(network: nn.Module) -> list[str]:
    """The last SASA layer of the encoder and the first of the decoder (SAUNet), or the last SASA layer (SAResNet
    and other networks without that split)."""
    names = list(attention_layers(network))
    if not names:
        raise ValueError(f"{type(network).__name__} has no StandAloneSelfAttention layer to take attention maps from.")
    encoder = [n for n in names if n.startswith("encoder")]
    decoder = [n for n in names if n.startswith("decoder")]
    return [encoder[-1], decoder[0]] if encoder and decoder else [names[-1]]


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
    for o, size in zip(offset, values.shape[-dims:]):
        source.append(slice(max(0, -o), size - max(0, o)))
        target.append(slice(max(0, o), size - max(0, -o)))
    out[tuple(target)] = values[tuple(source)]
    return out


def attention_statistics(attention: torch.Tensor, layer: StandAloneSelfAttention) -> dict[str, torch.Tensor]:
    """The three maps of one layer, each ``(B, 1, *S)`` at the layer's resolution.

    Args:
        attention: the layer's weights ``(B, heads, k^d, *S)`` (``layer(x, return_attention=True)[1]``).
        layer: the layer that produced them.
    """
    offsets = _offsets(layer)
    # position q attends to q + o with weight a[q, o]; position p receives a[p - o, o] from each neighbour p - o
    received = sum(_shifted(attention[:, :, i], o) for i, o in enumerate(offsets)).sum(1, keepdim=True)
    entropy = -(attention * attention.clamp_min(1e-12).log()).sum(2).mean(1, keepdim=True)
    lengths = torch.tensor([float(sum(c * c for c in o)) ** 0.5 for o in offsets], dtype=attention.dtype)
    distance = (attention * lengths.reshape((1, 1, -1) + (1,) * layer.spatial_dims)).sum(2).mean(1, keepdim=True)
    return {"attention_received": received, "attention_entropy": entropy, "attention_distance": distance}


@contextlib.contextmanager
def _capture_inputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].detach())) for name, m in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(network: nn.Module, image: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Attention statistics of chosen SASA layers for ``image``, upsampled to the image's spatial size.

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
            mode = "bilinear" if image.ndim == 4 else "trilinear"
            maps[name] = {
                key: F.interpolate(value, size=tuple(image.shape[2:]), mode=mode, align_corners=False)
                for key, value in attention_statistics(attention, available[name]).items()
            }
    return maps
