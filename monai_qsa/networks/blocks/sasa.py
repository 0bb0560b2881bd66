"""Stand-alone self-attention (Ramachandran et al., 2019) for 2D and 3D images."""

from __future__ import annotations

import math

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from monai_qsa.networks.blocks.local_attention import (
    fused_local_attention,
    local_attention_reference,
    neighbourhood_padding,
    relative_position_table,
)

__all__ = ["StandAloneSelfAttention"]


class StandAloneSelfAttention(nn.Module):
    """
    Local multi-head self-attention that can replace a ``k x k (x k)`` convolution.

    Every position attends to the ``kernel_size ** spatial_dims`` positions of its (optionally dilated)
    neighbourhood. Queries, keys and values come from one 1x1(x1) convolution. For head ``h`` and offset ``o``
    the logit is ``q . (k_o + r_o) / sqrt(d_head)`` where ``r_o`` is the relative-position embedding of the
    offset. As in the paper, ``r_o`` is factorised per axis: the head's channels are split into
    ``spatial_dims`` groups and ``r_o`` is the concatenation of one learned embedding per axis offset
    (row and column in 2D, plus depth in 3D). Neighbours outside the image are excluded from the softmax.

    The layer never materialises ``k^d`` copies of the keys or values. Without attention maps it runs fused
    kernels that never materialise the ``(B, heads, k^d, *spatial)`` logits either: inference (no gradient
    needed) ``torch.ops.monai_qsa.local_attention``, training the differentiable
    ``torch.ops.monai_qsa.local_attention_forward`` (its backward pass recomputes the attention from the saved
    log-sum-exp). Attention maps come from
    :func:`~monai_qsa.networks.blocks.local_attention.local_attention_reference`.
    When ``stride > 1`` the attention output is average-pooled, as in the paper.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        out_channels: number of output channels; divisible by ``num_heads``.
        kernel_size: odd side length of the attended neighbourhood. Defaults to 7.
        num_heads: number of attention heads. Defaults to 8.
        stride: downsampling factor applied by average pooling after the attention. Defaults to 1.
        dilation: spacing between attended neighbours. Defaults to 1.
        qkv_bias: whether the query/key/value projection has a bias. Defaults to False.

    Example::

        >>> layer = StandAloneSelfAttention(spatial_dims=2, in_channels=16, out_channels=32, kernel_size=5, num_heads=4)
        >>> layer(torch.randn(1, 16, 20, 24)).shape
        torch.Size([1, 32, 20, 24])
        >>> out, attn = layer(torch.randn(1, 16, 20, 24), return_attention=True)
        >>> attn.shape  # (batch, heads, kernel_size ** spatial_dims, *spatial)
        torch.Size([1, 4, 25, 20, 24])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        num_heads: int = 8,
        stride: int = 1,
        dilation: int = 1,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("num_heads", num_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}.")
        if out_channels % num_heads != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by num_heads ({num_heads}); "
                f"allowed num_heads are the divisors of {out_channels}."
            )
        head_channels = out_channels // num_heads
        if head_channels < spatial_dims:
            raise ValueError(
                f"out_channels // num_heads ({head_channels}) must be >= spatial_dims ({spatial_dims}) "
                "so that every axis gets relative-position channels; use fewer heads."
            )
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}.")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}.")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.stride = stride
        self.dilation = dilation
        self.scale = 1.0 / math.sqrt(head_channels)
        self.padding = neighbourhood_padding(kernel_size, dilation)
        # channels of each head given to each axis' relative embedding, as even as possible (paper: d/2 in 2D)
        base, extra = divmod(head_channels, spatial_dims)
        self.axis_channels = [base + (1 if axis < extra else 0) for axis in range(spatial_dims)]

        self.qkv = Conv[Conv.CONV, spatial_dims](in_channels, 3 * out_channels, kernel_size=1, bias=qkv_bias)
        self.rel_pos = nn.ParameterList(
            [nn.Parameter(torch.randn(kernel_size, channels) * channels**-0.5) for channels in self.axis_channels]
        )
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=stride, stride=stride) if stride > 1 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: input of shape ``(B, in_channels, *spatial)``.
            return_attention: also return the attention weights, shape ``(B, heads, k^d, *spatial)``,
                ordered as ``itertools.product(range(kernel_size), repeat=spatial_dims)`` over offsets
                (offset ``i`` on an axis is a displacement of ``(i - kernel_size // 2) * dilation``).

        Returns:
            the attended features ``(B, out_channels, *spatial / stride)``, and the attention if requested.
        """
        if x.ndim != self.spatial_dims + 2:
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(
                f"input must have {self.spatial_dims + 2} dimensions (B, C, {axes}), got shape {tuple(x.shape)}."
            )
        batch, spatial = x.shape[0], tuple(x.shape[2:])
        # (B, 3 * C_out, *S) -> (B, 3, heads, d_head, *S): queries, keys and values of every head
        qkv = self.qkv(x).reshape((batch, 3, self.num_heads, self.head_channels) + spatial)
        table = relative_position_table(list(self.rel_pos), self.axis_channels)
        if table.dtype != qkv.dtype:  # under autocast the projection is bf16/fp16 while the embeddings stay fp32
            table = table.to(qkv.dtype)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if return_attention:
            out, attn = local_attention_reference(qkv, table, self.kernel_size, self.dilation, self.scale)
        elif needs_grad:  # training: the fused kernel with its backward pass
            out = fused_local_attention(qkv, table, self.kernel_size, self.dilation, self.scale)
        else:  # inference: the operator exported into int8 artifacts
            out = torch.ops.monai_qsa.local_attention(qkv, table, self.kernel_size, self.dilation, self.scale)
        out = self.pool(out.reshape((batch, self.out_channels) + spatial))
        if return_attention:
            return out, attn
        return out
