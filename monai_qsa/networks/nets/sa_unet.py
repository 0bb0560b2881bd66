"""SAUNet: a U-Net whose 3x3 convolutions are stand-alone self-attention layers, and its cheaper design space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from monai_qsa.networks.arguments import records_arguments
from monai_qsa.networks.blocks.pixel_shuffle import pixel_shuffle_3d
from monai_qsa.networks.blocks.sa_unit import SAUnit

__all__ = ["SAUNet", "SAUNET_PRESETS"]

#: named SAUNet designs; a preset supplies the design arguments a caller leaves at None. Costs at 256x256 (2D) and
#: 96x96x96 (3D, with ``kernel_size=3``) against a channel-matched MONAI UNet: docs/networks.md,
#: perf/bench_saunet_presets.py
SAUNET_PRESETS: dict[str, dict] = {
    # the original SAUNet: attention from full resolution, transposed convolution + two SA units per decoder level
    "classic": {
        "features": (16, 32, 64, 128),
        "kernel_size": 7,
        "num_heads": 4,
        "stem_stride": 1,
        "stage_types": "sa",
        "decoder": "full",
    },
    # attention from 1/2 resolution, full decoder
    "s2": {
        "features": (16, 32, 64, 128),
        "kernel_size": 7,
        "num_heads": 4,
        "stem_stride": 2,
        "stage_types": "sa",
        "decoder": "full",
    },
    # attention from 1/2 resolution, light decoder
    "s2_light": {
        "features": (16, 32, 64, 128),
        "kernel_size": 7,
        "num_heads": 4,
        "stem_stride": 2,
        "stage_types": "sa",
        "decoder": "light",
    },
    # convolutions at 1/2 resolution, attention from 1/4 on, light decoder
    "s2_conv1_light": {
        "features": (16, 32, 64, 128),
        "kernel_size": (3, 7, 7, 7),
        "num_heads": 4,
        "stem_stride": 2,
        "stage_types": ("conv", "sa", "sa", "sa"),
        "decoder": "light",
    },
    # attention from 1/4 resolution, light decoder
    "s4_light": {
        "features": (16, 32, 64, 128),
        "kernel_size": 7,
        "num_heads": 4,
        "stem_stride": 4,
        "stage_types": "sa",
        "decoder": "light",
    },
    # s2_light at half the channels
    "s2_light_small": {
        "features": (8, 16, 32, 64),
        "kernel_size": 7,
        "num_heads": 2,
        "stem_stride": 2,
        "stage_types": "sa",
        "decoder": "light",
    },
    # s4_light at half the channels
    "s4_light_small": {
        "features": (8, 16, 32, 64),
        "kernel_size": 7,
        "num_heads": 2,
        "stem_stride": 4,
        "stage_types": "sa",
        "decoder": "light",
    },
    # s4_light_small one level shallower (attention at 1/4, 1/8 and 1/16; the fewest operators) with one head: at
    # 8 channels the softmax over the neighbours, not the channels' dot products, is most of the attention's work
    "s4_light_tiny": {
        "features": (8, 16, 32),
        "kernel_size": 7,
        "num_heads": 1,
        "stem_stride": 4,
        "stage_types": "sa",
        "decoder": "light",
    },
    # s4_light_tiny one level shallower still (attention at 1/4 and 1/8: five attention layers) with 5x5
    # neighbourhoods: the cheapest design, for lower Dice targets; with 7x7 it stayed at Dice 0 from its seed-0
    # initialisation in the seg2d sweep
    "s4_light_nano": {
        "features": (8, 16),
        "kernel_size": 5,
        "num_heads": 1,
        "stem_stride": 4,
        "stage_types": "sa",
        "decoder": "light",
    },
}

#: what each design argument resolves to without a preset: the classic SAUNet
_DEFAULT_DESIGN = dict(SAUNET_PRESETS["classic"])
STAGE_TYPES = ("sa", "conv")
DECODERS = ("full", "light")
STEM_STRIDES = (1, 2, 4)


def match_size(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pad (replicating the border) or crop the trailing spatial axes of ``x`` to the spatial size of ``reference``.

    Odd sizes leave an upsampled map one voxel short of its skip (floor pooling) or one voxel over (ceil pooling or
    a strided stem). Padding by a signed amount, often 0 (negative amounts crop), keeps the graph free of
    shape-dependent branches, so ``torch.export`` captures it for every input size.

    Args:
        x: map of shape ``(B, C, *spatial)``.
        reference: map whose spatial size ``x`` gets.

    Returns:
        ``x`` with the spatial size of ``reference``.
    """
    missing = [s - u for s, u in zip(reversed(reference.shape[2:]), reversed(x.shape[2:]))]
    return F.pad(x, [p for m in missing for p in (0, m)], mode="replicate")


class CeilMaxPool(nn.Module):
    """Max pooling by 2 that rounds odd sizes up (like ``ceil_mode=True``): every axis is first padded by one
    replicated border voxel, which the pooling windows of even axes never reach. ``ceil_mode`` itself makes
    ``torch.export`` guard on the input size (PyTorch drops a last window that would start in the padding), and
    padding odd axes only (by ``size % 2``) gives sizes whose lower bounds the exporter cannot prove, so both make
    dynamically shaped export fail.

    Args:
        spatial_dims: 2 or 3.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, [0, 1] * (x.ndim - 2), mode="replicate"))


def make_unit(
    spatial_dims: int,
    stage_type: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    num_heads: int,
    norm: str | tuple,
    act: str | tuple,
) -> nn.Module:
    """One spatial unit: attention + norm + act (``"sa"``) or convolution + norm + act (``"conv"``).

    Args:
        spatial_dims: 2 or 3.
        stage_type: ``"sa"`` or ``"conv"``.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: attended neighbourhood or convolution kernel side length (odd).
        num_heads: attention heads (``"sa"`` only).
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).

    Returns:
        a :class:`~monai_qsa.networks.blocks.SAUnit` or a MONAI ``Convolution``.
    """
    if stage_type == "sa":
        return SAUnit(spatial_dims, in_channels, out_channels, kernel_size, num_heads, norm=norm, act=act)
    return Convolution(spatial_dims, in_channels, out_channels, kernel_size=kernel_size, norm=norm, act=act)


class SADoubleUnit(nn.Sequential):
    """Two units, ``"sa"`` the attention counterpart of ``monai.networks.nets.basic_unet.TwoConv``, ``"conv"``
    TwoConv itself with any odd kernel size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: attended neighbourhood or convolution kernel side length (odd).
        num_heads: attention heads.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
        stage_type: ``"sa"`` (attention) or ``"conv"`` (convolution).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_heads: int,
        norm: str | tuple,
        act: str | tuple,
        stage_type: str = "sa",
    ) -> None:
        super().__init__(
            make_unit(spatial_dims, stage_type, in_channels, out_channels, kernel_size, num_heads, norm, act),
            make_unit(spatial_dims, stage_type, out_channels, out_channels, kernel_size, num_heads, norm, act),
        )


class SAUpCat(nn.Module):
    """Full decoder level: upsample by 2 with the function of a 2x2(x2) transposed convolution of stride 2
    (:class:`PixelShuffleUpsample`), pad to the skip's size, concatenate, then two units (:class:`SADoubleUnit`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser map.
        skip_channels: channels of the skip; the upsampling outputs as many.
        out_channels: output channels.
        kernel_size: attended neighbourhood or convolution kernel side length (odd).
        num_heads: attention heads.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
        stage_type: ``"sa"`` or ``"conv"`` units.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        kernel_size: int,
        num_heads: int,
        norm: str | tuple,
        act: str | tuple,
        stage_type: str = "sa",
    ) -> None:
        super().__init__()
        self.upsample = PixelShuffleUpsample(in_channels, skip_channels, 2, spatial_dims)
        self.attend = SADoubleUnit(
            spatial_dims, 2 * skip_channels, out_channels, kernel_size, num_heads, norm, act, stage_type
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.attend(torch.cat([skip, match_size(self.upsample(x), skip)], dim=1))


class LightUp(nn.Module):
    """Light decoder level: a 1x1(x1) projection to the skip's channels, nearest-neighbour upsampling by 2, sum
    with the skip (as in feature pyramid networks), then one unit. Projecting before upsampling computes the
    projection at the coarser resolution; nearest upsampling commutes with it, so nothing is lost.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser map.
        skip_channels: channels of the skip, and of the output.
        kernel_size: attended neighbourhood or convolution kernel side length (odd).
        num_heads: attention heads.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
        stage_type: ``"sa"`` or ``"conv"`` unit.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        kernel_size: int,
        num_heads: int,
        norm: str | tuple,
        act: str | tuple,
        stage_type: str,
    ) -> None:
        super().__init__()
        self.project = Conv[Conv.CONV, spatial_dims](in_channels, skip_channels, kernel_size=1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.unit = make_unit(spatial_dims, stage_type, skip_channels, skip_channels, kernel_size, num_heads, norm, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.unit(skip + match_size(self.upsample(self.project(x)), skip))


class StridedStem(nn.Sequential):
    """3x3(x3) convolutions of stride 2 (one for ``stride=2``, two for ``stride=4``), each with norm and act.
    Each halves the size rounding up, so no voxel is dropped.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        stride: 2 or 4.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, stride: int, norm: str | tuple, act: str | tuple
    ) -> None:
        super().__init__(
            *[
                Convolution(spatial_dims, channels, out_channels, strides=2, kernel_size=3, norm=norm, act=act)
                for channels in [in_channels] + [out_channels] * (stride // 2 - 1)
            ]
        )


class PixelShuffleUpsample(nn.Module):
    """Upsampling by ``stride`` that learns where within each ``stride``-sized cell a feature belongs: the function of
    a transposed convolution whose kernel equals its stride, computed as a 1x1(x1) convolution to
    ``out_channels * stride ** spatial_dims`` channels followed by a pixel shuffle (``F.pixel_shuffle`` in 2D,
    :func:`~monai_qsa.networks.blocks.pixel_shuffle.pixel_shuffle_3d` in 3D).

    int8 quantisation computes the 1x1(x1) convolution in int8 (in 3D with ``int8_conv3d``) but leaves transposed
    convolutions in fp32, on an fp32 copy of the input: at the full resolution of a strided stem that one layer took
    a third of the int8 ``"s4_light_small"`` SAUNet's time at 512x512 (2D). In 3D PyTorch's own transposed
    convolution of kernel = stride = 4 is slow in fp32 as well (2.3 ms for 16 -> 4 channels from 12x12x12, 0.3 ms
    this way; 2 threads). It is initialised as the transposed convolution (the same random draws, rearranged), and
    checkpoints saved with one (``weight`` of shape ``[in, out, *(stride,) * spatial_dims]``, ``bias`` ``[out]``)
    load unchanged.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: the upsampling factor per axis.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.spatial_dims = spatial_dims
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv = torch.nn.utils.skip_init(conv, in_channels, out_channels * stride**spatial_dims, kernel_size=1)
        # initialised as the transposed convolution it computes (same distribution, same random draws): a network
        # trains as it did with the transposed convolution
        transposed = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=stride, stride=stride)
        self.load_state_dict(transposed.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:
            return F.pixel_shuffle(self.conv(x), self.stride)
        return pixel_shuffle_3d(self.conv(x), self.stride)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        weight = state_dict.pop(f"{prefix}weight", None)
        if weight is not None:  # a transposed convolution's: out[c, s*y + i] = sum_k x[k, y] * w[k, c, i] + b[c]
            dims = weight.ndim - 2
            cells_first = weight.permute(1, *range(2, 2 + dims), 0)  # (out, *cell offsets, in)
            state_dict[f"{prefix}conv.weight"] = cells_first.reshape(-1, weight.shape[0], *(1,) * dims)
            bias = state_dict.pop(f"{prefix}bias", None)
            if bias is not None:
                state_dict[f"{prefix}conv.bias"] = bias.repeat_interleave(self.stride**dims)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ResolutionRestore(nn.Module):
    """Back from a strided stem's resolution to the input's: a transposed convolution with kernel = stride = the
    stem's stride (:class:`PixelShuffleUpsample`) to ``channels`` feature maps, cropped to the input size,
    concatenated with the input image itself (a full-resolution skip that costs nothing to keep), then one 3x3(x3)
    convolution + norm + act.

    The upsampling learns where within each ``stride``-sized cell a feature belongs (the sub-voxel
    placement MONAI's UNet also learns in its last, transposed, layer); the full-resolution convolution sees the
    image's own edges, which the strided stem averaged away, and aligns the boundaries to them. Bilinear upsampling
    of the logits would cost less but blurs boundaries; another level of attention or a full double unit at full
    resolution would cost more than the whole rest of the network (the cost the strided stem is there to remove).
    ``channels`` is kept small (a quarter of the first level's, at least 4) since the work here is per input voxel:
    the ``"s4_light"`` preset spends two thirds of its multiply-adds here in 3D (at ``kernel_size=3``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the decoder's output.
        image_channels: channels of the network's input.
        channels: output channels.
        stride: the stem's stride.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        image_channels: int,
        channels: int,
        stride: int,
        norm: str | tuple,
        act: str | tuple,
    ) -> None:
        super().__init__()
        self.upsample = PixelShuffleUpsample(in_channels, channels, stride, spatial_dims)
        self.refine = Convolution(spatial_dims, channels + image_channels, channels, kernel_size=3, norm=norm, act=act)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.refine(torch.cat([match_size(self.upsample(x), image), image], dim=1))


def make_decoder_level(
    decoder: str,
    spatial_dims: int,
    in_channels: int,
    skip_channels: int,
    kernel_size: int,
    num_heads: int,
    norm: str | tuple,
    act: str | tuple,
    stage_type: str,
) -> nn.Module:
    """One decoder level, ``"full"`` (:class:`SAUpCat`) or ``"light"`` (:class:`LightUp`), that outputs
    ``skip_channels`` channels at the skip's resolution.

    Args:
        decoder: ``"full"`` or ``"light"``.
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser map.
        skip_channels: channels of the skip, and of the output.
        kernel_size: attended neighbourhood or convolution kernel side length (odd).
        num_heads: attention heads.
        norm: MONAI norm name or (name, args).
        act: MONAI activation name or (name, args).
        stage_type: ``"sa"`` or ``"conv"`` units.

    Returns:
        a module called as ``level(x, skip)``.
    """
    if decoder == "full":
        return SAUpCat(
            spatial_dims, in_channels, skip_channels, skip_channels, kernel_size, num_heads, norm, act, stage_type
        )
    return LightUp(spatial_dims, in_channels, skip_channels, kernel_size, num_heads, norm, act, stage_type)


def _per_level(name: str, value, levels: int, check, expected: str) -> tuple:
    """``value`` (one for all levels, or one per level) as a tuple of ``levels`` entries, each passing ``check``."""
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * levels
    if len(values) != levels:
        raise ValueError(
            f"{name} needs one value or one entry per level of features ({levels} levels), got {value!r}; "
            "with a preset and features of another number of levels, pass it explicitly."
        )
    if not all(check(v) for v in values):
        raise ValueError(f"{name} entries must be {expected}, got {value!r}.")
    return values


@records_arguments
class SAUNet(nn.Module):
    """
    Encoder-decoder segmentation network with skip connections in which the spatial convolutions of the encoder
    and decoder blocks are :class:`~monai_qsa.networks.blocks.StandAloneSelfAttention` layers, and its design space.

    The default (the ``"classic"`` preset): a 3x3(x3) convolution stem lifts the input channels (the paper's best
    models keep a convolution stem), each level has two SA units, downsampling is max pooling and each decoder level
    upsamples with a transposed convolution, concatenates the skip and applies two SA units, as in MONAI's
    ``BasicUNet``; a 1x1(x1) convolution maps to the output channels.

    Cheaper designs (see ``SAUNET_PRESETS`` and docs/networks.md):

    - ``stem_stride`` 2 or 4: strided convolutions bring the input to 1/2 or 1/4 resolution before the first
      level, so attention runs from there on; :class:`ResolutionRestore` returns to the input resolution at the end
      (a transposed convolution, then a 3x3 convolution over it and the input image). Max pooling then rounds up,
      so every input size the classic network accepts still works.
    - ``stage_types``: ``"conv"`` levels use MONAI ``Convolution`` units instead of attention (``kernel_size`` is
      then the convolution's), in the encoder and in the decoder level of the same resolution.
    - ``kernel_size`` per level.
    - ``decoder="light"``: each level is a 1x1 projection, nearest upsampling, sum with the skip and one unit
      (:class:`LightUp`) instead of a transposed convolution, concatenation and two units.

    Every design accepts the input sizes the classic network does (at least ``2 ** (len(features) - 1)`` per
    axis); sizes divisible by ``stem_stride * 2 ** (len(features) - 1)`` avoid padding. No design has
    shape-dependent branches: ``torch.export`` captures each with dynamic shapes for sizes whose coarsest level
    has at least 2 voxels per axis (the exporter assumes sizes >= 2: from ``2 ** len(features)`` with
    ``stem_stride=1``, from ``stem_stride * 2 ** (len(features) - 1) + 1`` otherwise), and statically for any size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, including background).
        features: channels at each resolution level, finest first; those of ``"sa"`` levels divisible by
            ``num_heads``. Defaults to ``(16, 32, 64, 128)``.
        kernel_size: attended neighbourhood (``"sa"`` levels) or convolution kernel (``"conv"`` levels) side length,
            odd: one for all levels or one per level. Defaults to 7 (use 3 or 5 in 3D).
        num_heads: attention heads in every SA layer. Defaults to 4.
        norm: MONAI norm name or (name, args). Defaults to batch norm.
        act: MONAI activation name or (name, args). Defaults to ReLU.
        dropout: dropout probability before the output convolution.
        preset: name of an entry of ``SAUNET_PRESETS``; it supplies ``features``, ``kernel_size``, ``num_heads``,
            ``stem_stride``, ``stage_types`` and ``decoder`` where they are left at None. Without a preset they
            default to the ``"classic"`` design.
        stem_stride: 1, 2 or 4: the resolution (1/stem_stride) attention starts at. Defaults to 1.
        stage_types: ``"sa"`` or ``"conv"``: one for all levels or one per level. Defaults to ``"sa"``.
        decoder: ``"full"`` (transposed convolution + two units per level) or ``"light"`` (1x1 projection +
            nearest upsampling + one unit). Defaults to ``"full"``.

    Raises:
        ValueError: when an argument is invalid (the message names it), or ``preset`` is not a known name.

    Example::

        >>> net = SAUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 16, 32), num_heads=2)
        >>> net(torch.randn(1, 1, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
        >>> SAUNet(spatial_dims=3, in_channels=1, out_channels=2, preset="s2_light", kernel_size=3)(
        ...     torch.randn(1, 1, 33, 32, 31)).shape
        torch.Size([1, 2, 33, 32, 31])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] | None = None,
        kernel_size: int | Sequence[int] | None = None,
        num_heads: int | None = None,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.0,
        *,
        preset: str | None = None,
        stem_stride: int | None = None,
        stage_types: str | Sequence[str] | None = None,
        decoder: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if preset is not None and preset not in SAUNET_PRESETS:
            raise ValueError(f"preset must be one of {sorted(SAUNET_PRESETS)}, got {preset!r}.")
        design = {**_DEFAULT_DESIGN, **(SAUNET_PRESETS[preset] if preset is not None else {})}
        given = dict(
            features=features,
            kernel_size=kernel_size,
            num_heads=num_heads,
            stem_stride=stem_stride,
            stage_types=stage_types,
            decoder=decoder,
        )
        design.update({name: value for name, value in given.items() if value is not None})
        features, kernels, num_heads, stem_stride, stage_types, decoder = self._validated(**design)

        self.spatial_dims = spatial_dims
        self.stem_stride = stem_stride
        self.stage_types = stage_types
        self.decoder_type = decoder
        if stem_stride == 1:
            self.stem = Convolution(spatial_dims, in_channels, features[0], kernel_size=3, norm=norm, act=act)
        else:
            self.stem = StridedStem(spatial_dims, in_channels, features[0], stem_stride, norm, act)
        self.encoder = nn.ModuleList(
            [
                SADoubleUnit(
                    spatial_dims, features[max(i - 1, 0)], features[i], kernels[i], num_heads, norm, act, stage_types[i]
                )
                for i in range(len(features))
            ]
        )
        # a strided stem leaves the first level smaller than the input: round up so that no level becomes empty
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2) if stem_stride == 1 else CeilMaxPool(spatial_dims)
        self.decoder = nn.ModuleList(
            [
                make_decoder_level(
                    decoder,
                    spatial_dims,
                    features[i],
                    features[i - 1],
                    kernels[i - 1],
                    num_heads,
                    norm,
                    act,
                    stage_types[i - 1],
                )
                for i in range(len(features) - 1, 0, -1)
            ]
        )
        head_channels = features[0]
        self.restore: ResolutionRestore | None = None
        if stem_stride > 1:
            head_channels = max(features[0] // 4, 4)
            self.restore = ResolutionRestore(
                spatial_dims, features[0], in_channels, head_channels, stem_stride, norm, act
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = Conv[Conv.CONV, spatial_dims](head_channels, out_channels, kernel_size=1)

    @staticmethod
    def _validated(features, kernel_size, num_heads, stem_stride, stage_types, decoder) -> tuple:
        """The design arguments checked and normalised (kernel sizes and stage types one per level)."""
        features = tuple(features) if isinstance(features, Sequence) else (features,)
        if len(features) < 2 or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"features needs at least 2 levels of positive integers, got {features}.")
        levels = len(features)
        kernels = _per_level(
            "kernel_size", kernel_size, levels, lambda k: isinstance(k, int) and k > 0 and k % 2, "odd integers >= 1"
        )
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}.")
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {stem_stride!r}.")
        stage_types = _per_level(
            "stage_types", stage_types, levels, lambda t: t in STAGE_TYPES, f"one of {STAGE_TYPES}"
        )
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
        attention = [f for f, t in zip(features, stage_types) if t == "sa"]
        if any(f % num_heads for f in attention):
            raise ValueError(
                f"every entry of features {features} at an 'sa' level must be divisible by num_heads ({num_heads})."
            )
        return features, kernels, num_heads, stem_stride, stage_types, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"SAUNet with spatial_dims={self.spatial_dims} expects a (B, C, *spatial) input, got {tuple(x.shape)}."
            )
        image = x
        x = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the deepest level feeds the decoder directly
        for up in self.decoder:
            x = up(x, skips.pop())
        if self.restore is not None:
            x = self.restore(x, image)
        return self.head(self.dropout(x))
