"""Model complexity: parameters, multiply-accumulates and serialized size, measured the same way for every model."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from monai_qsa.networks.blocks.sasa import StandAloneSelfAttention

__all__ = ["count_parameters", "count_flops", "serialized_size"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    Args:
        model: the network.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _attention_macs(module: StandAloneSelfAttention, inputs: tuple, _output) -> None:
    """Forward hook adding the multiply-accumulates of the neighbourhood attention, which runs in a fused kernel
    (or as element-wise products and sums) that ``FlopCounterMode`` does not see: ``q . k_o`` and
    ``attn_o * v_o`` for each of the ``k^d`` offsets, plus the factorised relative logits (``k`` embeddings per
    axis, each over that axis' share of the head channels), per output channel and position."""
    x = inputs[0]
    positions = x.shape[0] * x[0, 0].numel()
    offsets = module.kernel_size**module.spatial_dims
    module._counted_macs += positions * module.out_channels * (2 * offsets + module.kernel_size)


def count_flops(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates (MACs) of one forward pass on ``example_input``: one multiply-add counts as one
    FLOP, the convention of the SASA paper and of most vision papers (``FlopCounterMode`` totals / 2).

    Convolutions, linear layers and matrix products are counted by :class:`torch.utils.flop_counter.FlopCounterMode`;
    the neighbourhood attention of :class:`StandAloneSelfAttention`, computed element-wise, is added analytically
    (``(2 * k^d + k) * out_channels`` MACs per position). Normalisation, activations, softmax and pooling are not
    counted, for any model, so CNNs and SA networks are compared on the same terms.

    Args:
        model: the network (fp32, eager).
        example_input: one input tensor, or a sequence of positional inputs.
    """
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    attention = [m for m in model.modules() if isinstance(m, StandAloneSelfAttention)]
    handles = []
    for module in attention:
        module._counted_macs = 0
        handles.append(module.register_forward_hook(_attention_macs))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*inputs)
        return counter.get_total_flops() // 2 + sum(m._counted_macs for m in attention)
    finally:
        for handle in handles:
            handle.remove()
        for module in attention:
            del module._counted_macs


def serialized_size(model_or_path: nn.Module | torch.export.ExportedProgram | str | os.PathLike) -> int:
    """Size in bytes of a model as it would be stored.

    Args:
        model_or_path: a file (its size on disk), an ``nn.Module`` (its ``state_dict`` saved with ``torch.save``),
            or a ``torch.export.ExportedProgram`` (saved with ``torch.export.save``).
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return os.path.getsize(model_or_path)
    buffer = io.BytesIO()
    if isinstance(model_or_path, torch.export.ExportedProgram):
        torch.export.save(model_or_path, buffer)
    elif isinstance(model_or_path, nn.Module):
        torch.save(model_or_path.state_dict(), buffer)
    else:
        raise TypeError(f"model_or_path must be a path, nn.Module or ExportedProgram, got {type(model_or_path).__name__}.")
    return buffer.getbuffer().nbytes
