"""torch.compile settings for running SA networks on CPUs."""

from __future__ import annotations

from torch import nn
import torch

__all__ = ["compile_for_cpu", "CPU_COMPILE_OPTIONS"]

# Inductor's layout optimisation turns convolution outputs channels-last, which makes the attention
# kernels read each head's channels with a large stride and vectorise badly (about 2x slower on AVX2).
CPU_COMPILE_OPTIONS = {"layout_optimization": False}


def compile_for_cpu(module: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """Compile ``module`` with Inductor using :data:`CPU_COMPILE_OPTIONS`.

    Args:
        module: an fp32 network, or an int8 module from :func:`monai_qsa.quantization.quantize_ptq`.
        dynamic: passed to ``torch.compile``; ``None`` lets it decide after seeing a second shape.
    """
    return torch.compile(module, dynamic=dynamic, options=CPU_COMPILE_OPTIONS)
