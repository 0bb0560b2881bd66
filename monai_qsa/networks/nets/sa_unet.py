"""SAUNet: a U-Net whose 3x3 convolutions are stand-alone self-attention layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from monai_qsa.networks.blocks.sa_unit import SAUnit

__all__ = ["SAUNet"]


class SADoubleUnit(nn.Sequential):
    """Two SA units, the attention counterpart of ``monai.networks.nets.basic_unet.TwoConv``."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, num_heads: int, norm, act
    ) -> None:
        super().__init__(
            SAUnit(spatial_dims, in_channels, out_channels, kernel_size, num_heads, norm=norm, act=act),
            SAUnit(spatial_dims, out_channels, out_channels, kernel_size, num_heads, norm=norm, act=act),
        )


class SAUpCat(nn.Module):
    """Upsample by 2 with a transposed convolution, pad to the skip's size, concatenate, then two SA units."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        kernel_size: int,
        num_heads: int,
        norm,
        act,
    ) -> None:
        super().__init__()
        self.upsample = Conv[Conv.CONVTRANS, spatial_dims](in_channels, skip_channels, kernel_size=2, stride=2)
        self.attend = SADoubleUnit(
            spatial_dims, 2 * skip_channels, out_channels, kernel_size, num_heads, norm=norm, act=act
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        # odd input sizes: the upsampled map can be one voxel short of the skip on some axes
        # odd skip sizes leave the upsampled map one short; padding unconditionally (often by 0) keeps the graph
        # free of shape-dependent branches, so torch.export captures it for every input size
        missing = [s - u for s, u in zip(reversed(skip.shape[2:]), reversed(x.shape[2:]))]
        x = F.pad(x, [p for m in missing for p in (0, m)], mode="replicate")
        return self.attend(torch.cat([skip, x], dim=1))


class SAUNet(nn.Module):
    """
    Encoder-decoder segmentation network with skip connections in which every spatial convolution of the
    encoder and decoder blocks is a :class:`~monai_qsa.networks.blocks.StandAloneSelfAttention` layer.
    A 3x3(x3) convolution stem lifts the input channels (the paper's best models keep a convolution stem)
    and a 1x1(x1) convolution maps to the output channels. Downsampling is max pooling, upsampling a
    transposed convolution, as in MONAI's ``BasicUNet``. Any input size works; sizes divisible by
    ``2 ** (len(features) - 1)`` avoid padding.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, including background).
        features: channels at each resolution level, finest first; each divisible by ``num_heads``.
        kernel_size: attended neighbourhood side length (odd). Defaults to 7 (use 3 or 5 in 3D).
        num_heads: attention heads in every SA layer.
        norm: MONAI norm name or (name, args). Defaults to batch norm.
        act: MONAI activation name or (name, args). Defaults to ReLU.
        dropout: dropout probability before the output convolution.

    Example::

        >>> net = SAUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 16, 32), num_heads=2)
        >>> net(torch.randn(1, 1, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 64, 128),
        kernel_size: int = 7,
        num_heads: int = 4,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        features = tuple(features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels, got {features}.")
        if any(f % num_heads for f in features):
            raise ValueError(f"every entry of features {features} must be divisible by num_heads ({num_heads}).")
        self.spatial_dims = spatial_dims
        self.stem = Convolution(spatial_dims, in_channels, features[0], kernel_size=3, norm=norm, act=act)
        self.encoder = nn.ModuleList(
            [SADoubleUnit(spatial_dims, features[0], features[0], kernel_size, num_heads, norm, act)]
            + [
                SADoubleUnit(spatial_dims, features[i - 1], features[i], kernel_size, num_heads, norm, act)
                for i in range(1, len(features))
            ]
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        self.decoder = nn.ModuleList(
            [
                SAUpCat(spatial_dims, features[i], features[i - 1], features[i - 1], kernel_size, num_heads, norm, act)
                for i in range(len(features) - 1, 0, -1)
            ]
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = Conv[Conv.CONV, spatial_dims](features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"SAUNet with spatial_dims={self.spatial_dims} expects a (B, C, *spatial) input, got {tuple(x.shape)}."
            )
        x = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the deepest level feeds the decoder directly
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(self.dropout(x))
