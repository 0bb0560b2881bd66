"""Model complexity: parameters, multiply-accumulates and serialized size, measured the same way for every model."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops", "serialized_size"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    Args:
        model: the network.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates (MACs) of one forward pass on ``example_input``: one multiply-add counts as one
    FLOP, the convention of the SASA paper and of most vision papers (``FlopCounterMode`` totals / 2).

    Convolutions, linear layers and matrix products are counted by :class:`torch.utils.flop_counter.FlopCounterMode`,
    and so is the neighbourhood attention of :class:`~monai_qsa.networks.blocks.StandAloneSelfAttention`, whose
    operators register their formula (``(2 * k^d + k) * out_channels`` MACs per position). Normalisation,
    activations, softmax and pooling are not counted, for any model, so CNNs and SA networks are compared on the
    same terms.

    Args:
        model: the network (fp32, eager).
        example_input: one input tensor, or a sequence of positional inputs.
    """
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2


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
        raise TypeError(
            f"model_or_path must be a path, nn.Module or ExportedProgram, got {type(model_or_path).__name__}."
        )
    return buffer.getbuffer().nbytes
