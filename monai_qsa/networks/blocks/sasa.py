"""Stand-alone self-attention (Ramachandran et al., 2019) for 2D and 3D images."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

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

    The layer never materialises ``k^d`` copies of the keys or values: it loops over the offsets, reading
    shifted views of the padded keys/values, and keeps only the ``(B, heads, k^d, *spatial)`` logits.
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
        self.padding = dilation * (kernel_size - 1) // 2
        # channels of each head given to each axis' relative embedding, as even as possible (paper: d/2 in 2D)
        base, extra = divmod(head_channels, spatial_dims)
        self.axis_channels = [base + (1 if axis < extra else 0) for axis in range(spatial_dims)]

        self.qkv = Conv[Conv.CONV, spatial_dims](in_channels, 3 * out_channels, kernel_size=1, bias=qkv_bias)
        self.rel_pos = nn.ParameterList(
            [nn.Parameter(torch.randn(kernel_size, channels) * channels**-0.5) for channels in self.axis_channels]
        )
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=stride, stride=stride) if stride > 1 else nn.Identity()
        self.offsets = list(itertools.product(range(kernel_size), repeat=spatial_dims))

    def _window(self, offset: tuple[int, ...], spatial: tuple) -> tuple[slice, ...]:
        """Index selecting, from a padded tensor, the neighbours at ``offset`` of every position."""
        return (Ellipsis,) + tuple(
            slice(i * self.dilation, i * self.dilation + size) for i, size in zip(offset, spatial)
        )

    def _relative_logits(self, q: torch.Tensor, offsets_last: bool) -> torch.Tensor:
        """Relative-position logits ``q . r_o`` of every offset.

        Args:
            q: scaled queries, shape ``(B, heads, d_head, *S)``.
            offsets_last: layout of the result: ``(B, heads, *S, k^d)`` if True, else ``(B, heads, k^d, *S)``.
        """
        k, dims = self.kernel_size, self.spatial_dims
        total = None
        for axis, q_axis in enumerate(torch.split(q, self.axis_channels, dim=2)):
            # (B, heads, c_axis, *S) x (k, c_axis) -> (B, heads, *S, k)
            logits = torch.einsum("bhc...,kc->bh...k", q_axis, self.rel_pos[axis])
            # broadcastable (B, heads, *S, 1.., k, ..1): this axis' offset index in offset position `axis`
            view = [1] * dims
            view[axis] = k
            logits = logits.reshape(logits.shape[:-1] + tuple(view))
            total = logits if total is None else total + logits
        total = total.flatten(-dims)  # (B, heads, *S, k^d), offsets in itertools.product order
        return total if offsets_last else total.movedim(-1, 2)

    def _attend_looped(
        self, q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, inside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager path: one offset at a time, reading shifted views of the padded keys and values.

        Args:
            q: scaled queries ``(B, heads, d_head, *S)``.
            k_pad: zero-padded keys ``(B, heads, d_head, *(S + 2p))``.
            v_pad: zero-padded values, same shape as ``k_pad``.
            inside: ``(1, 1, *(S + 2p))``, True on the image and False on the padding.

        Returns:
            the output ``(B, heads, d_head, *S)`` and the attention ``(B, heads, k^d, *S)``.
        """
        spatial = tuple(q.shape[3:])
        windows = [self._window(offset, spatial) for offset in self.offsets]
        logits = torch.stack([(q * k_pad[w]).sum(2) for w in windows], dim=2)
        logits = logits + self._relative_logits(q, offsets_last=False)
        valid = torch.stack([inside[w] for w in windows], dim=2)  # (1, 1, k^d, *S)
        attn = logits.masked_fill(~valid, float("-inf")).softmax(dim=2)
        out = None
        for index, w in enumerate(windows):
            term = attn[:, :, index : index + 1] * v_pad[w]  # (B, heads, 1, *S) * (B, heads, d_head, *S)
            out = term if out is None else out + term
        return out, attn

    def _sliding_windows(self, padded: torch.Tensor) -> torch.Tensor:
        """A strided view ``(..., *[k] * d, *S)`` of every neighbourhood of a padded tensor; copies nothing."""
        dims, span = self.spatial_dims, self.dilation * (self.kernel_size - 1) + 1
        for axis in range(padded.ndim - dims, padded.ndim):
            padded = padded.unfold(axis, span, 1)  # appends a window axis of size `span`
        if self.dilation > 1:
            padded = padded[(Ellipsis,) + (slice(None, None, self.dilation),) * dims]
        # (..., *S, *k) -> (..., *k, *S): positions innermost, so fused loops vectorise along the image rows
        return padded.movedim(tuple(range(-2 * dims, -dims)), tuple(range(-dims, 0)))

    def _attend_windowed(
        self, q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, inside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Traced path (``torch.compile``/``torch.export``): the function of ``_attend_looped`` written over
        sliding-window views, which Inductor fuses into reductions that never materialise the windows.
        Arguments and results as in ``_attend_looped``.
        """
        dims = self.spatial_dims
        k_windows = self._sliding_windows(k_pad)  # (B, heads, d_head, *k, *S)
        # (B, heads, d_head, 1.., *S) * (B, heads, d_head, *k, *S), summed over d_head -> (B, heads, k^d, *S)
        logits = (q.unflatten(2, (-1,) + (1,) * dims) * k_windows).sum(2).flatten(2, 1 + dims)
        logits = logits + self._relative_logits(q, offsets_last=False)
        valid = self._sliding_windows(inside).flatten(2, 1 + dims)  # (1, 1, k^d, *S)
        attn = logits.masked_fill(~valid, float("-inf")).softmax(dim=2)
        # (B, heads, 1, *k, *S) * (B, heads, d_head, *k, *S), summed over the offsets -> (B, heads, d_head, *S)
        weights = attn.unflatten(2, (self.kernel_size,) * dims).unsqueeze(2)
        out = (weights * self._sliding_windows(v_pad)).sum(tuple(range(3, 3 + dims)))
        return out, attn

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
            raise ValueError(
                f"input must have {self.spatial_dims + 2} dimensions (B, C, {'H, W' if self.spatial_dims == 2 else 'D, H, W'}), "
                f"got shape {tuple(x.shape)}."
            )
        batch, spatial = x.shape[0], tuple(x.shape[2:])
        heads, d_head = self.num_heads, self.head_channels
        # (B, 3 * C_out, *S) -> three of (B, heads, d_head, *S)
        q, k, v = self.qkv(x).contiguous().reshape((batch, 3, heads, d_head) + spatial).unbind(1)
        q = q * self.scale
        pad = [self.padding] * (2 * self.spatial_dims)
        k_pad, v_pad = F.pad(k, pad), F.pad(v, pad)  # (B, heads, d_head, *(S + 2p))
        inside = F.pad(torch.ones((1, 1) + spatial, dtype=torch.bool, device=x.device), pad)  # (1, 1, *(S + 2p))

        # Eager runs loop over offsets (memory-light); traced graphs use strided window views, which
        # Inductor fuses into single reductions that never materialise them. Both compute the same function.
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            out, attn = self._attend_windowed(q, k_pad, v_pad, inside)
        else:
            out, attn = self._attend_looped(q, k_pad, v_pad, inside)
        out = self.pool(out.reshape((batch, self.out_channels) + spatial))
        if return_attention:
            return out, attn
        return out
