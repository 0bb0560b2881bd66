"""SAResNet: a bottleneck ResNet whose spatial convolutions are stand-alone self-attention layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from monai_qsa.networks.arguments import records_arguments
from monai_qsa.networks.blocks.sa_unit import SAUnit

__all__ = ["SAResNet", "SABottleneck", "SARESNET_PRESETS"]

# blocks per stage; each bottleneck has 3 layers, plus the stem and the classifier
SARESNET_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "sa26": (1, 2, 4, 1),
    "sa38": (2, 3, 5, 2),
    "sa50": (3, 4, 6, 3),
}


class SABottleneck(nn.Module):
    """ResNet bottleneck (1x1 conv -> SA -> 1x1 conv) with the 3x3 convolution replaced by attention.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        planes: bottleneck width; the block outputs ``planes * expansion`` channels.
        stride: downsampling of the attention layer (average pooling) and of the shortcut.
        kernel_size: attended neighbourhood side length (odd).
        num_heads: attention heads.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
    """

    expansion = 4

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        planes: int,
        stride: int,
        kernel_size: int,
        num_heads: int,
        norm: str | tuple,
        act: str | tuple,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.reduce = Convolution(spatial_dims, in_channels, planes, kernel_size=1, norm=norm, act=act)
        self.attend = SAUnit(spatial_dims, planes, planes, kernel_size, num_heads, stride=stride, norm=norm, act=act)
        self.expand = Convolution(spatial_dims, planes, out_channels, kernel_size=1, norm=norm, act=None)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            pool = Pool[Pool.AVG, spatial_dims](kernel_size=stride, stride=stride) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(
                pool, Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm, act=None)
            )
        self.act = get_act_layer(name=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.attend(self.reduce(x))) + self.shortcut(x))


@records_arguments
class SAResNet(nn.Module):
    """
    Classification network of Ramachandran et al. (2019): a bottleneck ResNet with every spatial convolution
    of its residual blocks replaced by stand-alone self-attention, a convolution stem and a linear classifier.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: number of output logits.
        layers: blocks per stage, or a preset name from ``SARESNET_PRESETS``
            (``"sa26"`` = 26 layers, ``"sa38"``, ``"sa50"``). Defaults to ``"sa26"``.
        block_inplanes: bottleneck width of each stage; divisible by ``num_heads``.
        kernel_size: attended neighbourhood side length (odd). Defaults to 7.
        num_heads: attention heads. Defaults to 8.
        stem_features: channels of the convolution stem.
        stem_stride: stride of the stem convolution (max pooling by 2 follows when > 1).
        norm: MONAI norm name or (name, args). Defaults to batch norm.
        act: MONAI activation name or (name, args). Defaults to ReLU.
        dropout: dropout probability before the classifier.

    Example::

        >>> net = SAResNet(spatial_dims=2, in_channels=1, num_classes=6, block_inplanes=(16, 32, 64, 128))
        >>> net(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 6])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        layers: str | Sequence[int] = "sa26",
        block_inplanes: Sequence[int] = (32, 64, 128, 256),
        kernel_size: int = 7,
        num_heads: int = 8,
        stem_features: int = 32,
        stem_stride: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if isinstance(layers, str):
            if layers not in SARESNET_PRESETS:
                raise ValueError(f"layers preset must be one of {sorted(SARESNET_PRESETS)}, got {layers!r}.")
            layers = SARESNET_PRESETS[layers]
        layers, block_inplanes = tuple(layers), tuple(block_inplanes)
        if len(layers) != len(block_inplanes) or not layers:
            raise ValueError(f"layers {layers} and block_inplanes {block_inplanes} must be non-empty and equally long.")
        if any(p % num_heads for p in block_inplanes):
            raise ValueError(
                f"every entry of block_inplanes {block_inplanes} must be divisible by num_heads ({num_heads})."
            )
        self.spatial_dims = spatial_dims
        stem: list[nn.Module] = [
            Convolution(
                spatial_dims,
                in_channels,
                stem_features,
                strides=stem_stride,
                kernel_size=7 if stem_stride > 1 else 3,
                norm=norm,
                act=act,
            )
        ]
        if stem_stride > 1:
            stem.append(Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)

        stages, channels = [], stem_features
        for stage, (blocks, planes) in enumerate(zip(layers, block_inplanes)):
            units = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                units.append(SABottleneck(spatial_dims, channels, planes, stride, kernel_size, num_heads, norm, act))
                channels = planes * SABottleneck.expansion
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"SAResNet with spatial_dims={self.spatial_dims} expects a (B, C, *spatial) input, "
                f"got {tuple(x.shape)}."
            )
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(self.dropout(x))
