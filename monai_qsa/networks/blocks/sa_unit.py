"""The SA counterpart of MONAI's ``Convolution`` block: attention + normalisation + activation."""

from __future__ import annotations

from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from monai_qsa.networks.blocks.sasa import StandAloneSelfAttention

__all__ = ["SAUnit"]


class SAUnit(nn.Sequential):
    """Stand-alone self-attention followed by normalisation and (optionally) an activation: the SA counterpart
    of MONAI's ``Convolution`` block (conv -> norm -> act).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: attended neighbourhood side length (odd).
        num_heads: attention heads.
        stride: downsampling after attention (average pooling).
        norm: MONAI norm name/tuple, e.g. ``"batch"`` or ``("group", {"num_groups": 4})``.
        act: MONAI activation name/tuple, or None for no activation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_heads: int,
        stride: int = 1,
        norm: str | tuple = "batch",
        act: str | tuple | None = "relu",
    ) -> None:
        super().__init__()
        self.add_module(
            "attn",
            StandAloneSelfAttention(
                spatial_dims, in_channels, out_channels, kernel_size=kernel_size, num_heads=num_heads, stride=stride
            ),
        )
        self.add_module("norm", get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=out_channels))
        if act is not None:
            self.add_module("act", get_act_layer(name=act))
