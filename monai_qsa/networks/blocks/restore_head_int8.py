"""Int8 resolution restore and head of a SAUNet with a strided stem: ``torch.ops.monai_qsa.restore_head_int8``.

In an int8 program the last layers of such a SAUNet (:class:`~monai_qsa.networks.nets.sa_unet.ResolutionRestore`
and the 1x1(x1) head) are a pixel shuffle of the upsampling convolution's output, a crop or replicate-pad to the
image size, a concatenation with the image, a quantisation, a 3x3(x3) int8 convolution + ReLU (the batch norm folded
in), a requantisation and a 1x1(x1) int8 convolution: all at full resolution on a handful of channels, where the
graph spent about 40 % of a small 2D network's time and a third of a 3D one's (layout passes, and convolution
kernels made for many channels). This operator computes the same function in one pass: the C kernel
``restore_head_int8`` of ``local_attention_int8.c`` (int32 sums of uint8 codes x int8 weights on the
instruction-set paths of the int8 attention, ``$MONAI_QSA_INT8_ATTENTION_PATH`` included; fp32 after the sums), or
:func:`restore_head_int8_reference` in PyTorch operations without a C compiler. Both give the same output, to the bit.

:func:`monai_qsa.quantization.int8_restore.fuse_restore_heads` puts it into int8 programs.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

# private helpers shared with the int8 attention on purpose: the same library, paths and thread policy
from monai_qsa.networks.blocks.local_attention import _check_status, _threads_for
from monai_qsa.networks.blocks.local_attention_int8 import (
    INT8_ATTENTION_PATHS,
    _define_inference_operator,
    _library,
    _requested_path,
)
from monai_qsa.networks.blocks.pixel_shuffle import pixel_shuffle_3d

__all__ = [
    "MAX_REFINE_INPUTS",
    "MAX_REFINED_CHANNELS",
    "MAX_STRIDE",
    "check_restore_head_arguments",
    "restore_head_int8",
    "restore_head_int8_reference",
]

#: refined channels the C kernel keeps in registers (``MAX_MID`` in the C source)
MAX_REFINED_CHANNELS = 16
#: input channels of the refinement whose int32 sums cannot overflow (3^dims x 255 x 128 per channel), by dims
MAX_REFINE_INPUTS = {2: 4096, 3: 2048}
#: largest pixel-shuffle factor (``MAX_STRIDE`` in the C source)
MAX_STRIDE = 64
_NAME = "monai_qsa.restore_head_int8"
_UINT8_MAX = 255
_SCALES_MESSAGE = _NAME + ": {} must hold positive finite scales."


def restore_head_int8_reference(
    features: torch.Tensor, image: torch.Tensor, stride: int, in_scale: float, in_zero_point: int,
    refine_weight: torch.Tensor, refine_weight_scale: torch.Tensor, refine_bias: torch.Tensor | None,
    mid_scale: float, mid_zero_point: int, head_weight: torch.Tensor, head_weight_scale: torch.Tensor,
    head_bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The operator's function in PyTorch operations, in the C kernel's order of fp32 roundings; 2D or 3D.

    Args:
        features: the upsampling convolution's output ``(B, C * stride**dims, [d,] h, w)``, fp32.
        image: the network's input ``(B, Ci, [D,] H, W)``, fp32.
        stride: the pixel shuffle's factor (the stem's stride).
        in_scale: uint8 scale of the refinement's input (the pixel-shuffled features, cropped or replicated at the
            far borders to the image's size, and the image, concatenated).
        in_zero_point: its zero point.
        refine_weight: the 3x3(x3) refinement's weight ``(mid, C + Ci, [3,] 3, 3)``, int8.
        refine_weight_scale: its per-output-channel scales ``(mid,)``, fp32.
        refine_bias: its bias ``(mid,)`` or None.
        mid_scale: uint8 scale of the refinement's output after ReLU.
        mid_zero_point: its zero point.
        head_weight: the 1x1(x1) head's weight ``(out_channels, mid, 1, 1[, 1])``, int8.
        head_weight_scale: its per-output-channel scales ``(out_channels,)``, fp32.
        head_bias: its bias ``(out_channels,)`` or None.

    Returns:
        the head's output ``(B, out_channels, [D,] H, W)``, fp32.
    """
    from monai_qsa.networks.nets.sa_unet import match_size  # the network's own crop/pad (nets import blocks)

    dims = image.ndim - 2
    shuffled = F.pixel_shuffle(features, stride) if dims == 2 else pixel_shuffle_3d(features, stride)
    x = torch.cat([match_size(shuffled, image), image], dim=1) * (1.0 / in_scale)
    x = torch.where(x < 512, x, 512.0)  # as the kernel: NaN to 512 (code 255)
    x = torch.where(x > -512, x, -512.0)
    codes = torch.clamp(torch.round(x) + in_zero_point, 0, _UINT8_MAX)
    # integer sums, exact in float64; the zero padding of (codes - zero point) is the kernel's real zero
    conv = F.conv2d if dims == 2 else F.conv3d
    sums = conv((codes - in_zero_point).double(), refine_weight.double(), padding=1).float()
    per_channel = (1, -1) + (1,) * dims
    refined = sums * (refine_weight_scale * in_scale).view(per_channel)
    refined = refined + (0.0 if refine_bias is None else refine_bias.view(per_channel))  # + 0: -0 to +0 as the kernel
    refined = torch.where(refined > 0, refined, 0.0)  # ReLU, NaN to 0 as in the kernel
    code = refined * (1.0 / mid_scale)
    code = torch.round(torch.where(code < 512, code, 512.0)) + mid_zero_point
    mid = (torch.where(code < _UINT8_MAX, code, float(_UINT8_MAX)) - mid_zero_point) * mid_scale
    head = head_weight.reshape(head_weight.shape[0], -1).float() * head_weight_scale.view(-1, 1)
    out = mid[:, :1] * head[:, 0].view(per_channel)
    for channel in range(1, head.shape[1]):
        out = out + mid[:, channel : channel + 1] * head[:, channel].view(per_channel)
    return out + (0.0 if head_bias is None else head_bias.view(per_channel))


def check_restore_head_arguments(
    features: torch.Tensor, image: torch.Tensor, stride: int, in_scale: float, in_zero_point: int,
    refine_weight: torch.Tensor, refine_weight_scale: torch.Tensor, refine_bias: torch.Tensor | None,
    mid_scale: float, mid_zero_point: int, head_weight: torch.Tensor, head_weight_scale: torch.Tensor,
    head_bias: torch.Tensor | None, kernel_checks_scales: bool = False,
) -> None:  # fmt: skip
    """``ValueError`` naming the argument when the operator's arguments do not fit together (a model file chooses
    them); the weight scales' values are left to the C kernel with ``kernel_checks_scales`` (a tensor test per call
    costs more than the kernel's loop)."""

    def fail(message: str) -> None:
        raise ValueError(f"{_NAME}: {message}")

    for name, tensor, dtype in (
        ("features", features, torch.float32),
        ("image", image, torch.float32),
        ("refine_weight", refine_weight, torch.int8),
        ("refine_weight_scale", refine_weight_scale, torch.float32),
        ("refine_bias", refine_bias, torch.float32),
        ("head_weight", head_weight, torch.int8),
        ("head_weight_scale", head_weight_scale, torch.float32),
        ("head_bias", head_bias, torch.float32),
    ):
        if tensor is None and name.endswith("bias"):
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.dtype != dtype:
            fail(f"{name} must be a dense {dtype} tensor.")
        if tensor.device != features.device:
            fail(f"{name} is on {tensor.device}, features on {features.device}.")
    dims = features.ndim - 2
    if dims not in (2, 3) or image.ndim != features.ndim or features.shape[0] != image.shape[0]:
        fail(f"features and image must be (B, C, H, W) or (B, C, D, H, W) of one batch, got "
             f"{tuple(features.shape)} and {tuple(image.shape)}.")  # fmt: skip
    cells = stride**dims if isinstance(stride, int) and 1 <= stride <= MAX_STRIDE else 0
    if not cells or features.shape[1] % cells:
        power = "square" if dims == 2 else "cube"
        fail(f"stride must be an integer from 1 to {MAX_STRIDE} whose {power} divides features' "
             f"{features.shape[1]} channels, got {stride!r}.")  # fmt: skip
    if 0 in features.shape[1:]:
        fail(f"features must have at least one channel and position, got shape {tuple(features.shape)}.")
    in_channels = features.shape[1] // cells + image.shape[1]
    if in_channels > MAX_REFINE_INPUTS[dims]:
        fail(f"the {dims}D refinement takes at most {MAX_REFINE_INPUTS[dims]} input channels, got {in_channels}.")
    kernel = (in_channels,) + (3,) * dims
    mid = refine_weight.shape[0] if refine_weight.ndim == dims + 2 else 0
    if tuple(refine_weight.shape[1:]) != kernel:
        fail(f"refine_weight must be (mid, {', '.join(map(str, kernel))}), got {tuple(refine_weight.shape)}.")
    if not 1 <= mid <= MAX_REFINED_CHANNELS:
        fail(f"refine_weight has {mid} output channels; the kernel takes 1 to {MAX_REFINED_CHANNELS}.")
    out_channels = head_weight.shape[0] if head_weight.ndim in (2, dims + 2) else 0
    if out_channels == 0 or tuple(head_weight.shape[1:]) not in ((mid,), (mid,) + (1,) * dims):
        fail(f"head_weight must be (out_channels, {mid}{', 1' * dims}), got {tuple(head_weight.shape)}.")
    for name, tensor, size in (
        ("refine_weight_scale", refine_weight_scale, mid),
        ("refine_bias", refine_bias, mid),
        ("head_weight_scale", head_weight_scale, out_channels),
        ("head_bias", head_bias, out_channels),
    ):
        if tensor is not None and tuple(tensor.shape) != (size,):
            fail(f"{name} must have shape ({size},), got {tuple(tensor.shape)}.")
    for name, scale in (("in_scale", in_scale), ("mid_scale", mid_scale)):
        if not 0 < scale < math.inf:
            fail(f"{name} must be positive and finite, got {scale}.")
    for name, zero_point in (("in_zero_point", in_zero_point), ("mid_zero_point", mid_zero_point)):
        if not 0 <= zero_point <= _UINT8_MAX:
            fail(f"{name} must be a uint8 code (0 to 255), got {zero_point}.")
    if kernel_checks_scales:
        return
    for name, scales in (("refine_weight_scale", refine_weight_scale), ("head_weight_scale", head_weight_scale)):
        if not bool(((scales > 0) & (scales < math.inf)).all()):
            raise ValueError(_SCALES_MESSAGE.format(name))


def restore_head_int8(
    features: torch.Tensor, image: torch.Tensor, stride: int, in_scale: float, in_zero_point: int,
    refine_weight: torch.Tensor, refine_weight_scale: torch.Tensor, refine_bias: torch.Tensor | None,
    mid_scale: float, mid_zero_point: int, head_weight: torch.Tensor, head_weight_scale: torch.Tensor,
    head_bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The int8 resolution restore and head, 2D or 3D: :func:`restore_head_int8_reference`'s output (same
    arguments), computed by the C kernel for CPU tensors (``features`` and ``image`` in any memory layout). Raises
    ``ValueError`` naming the argument when the arguments do not fit together."""
    arguments = (features, image, stride, in_scale, in_zero_point, refine_weight, refine_weight_scale, refine_bias,
                 mid_scale, mid_zero_point, head_weight, head_weight_scale, head_bias)  # fmt: skip
    path = _requested_path()
    library = None if path == "torch" else _library()
    native = library is not None and features.device.type == "cpu"
    check_restore_head_arguments(*arguments, kernel_checks_scales=native)
    if not native:
        return restore_head_int8_reference(*arguments)
    dims = features.ndim - 2
    # 2D as 3D of depth 1: a depth of 1 and a depth stride of 0 for the features and the image
    feature_strides, image_strides = (
        (*tensor.stride()[:2], *([0] * (3 - dims)), *tensor.stride()[2:]) for tensor in (features, image)
    )
    batch, feature_channels, *low = features.shape
    depth, height, width = [1] * (3 - dims) + low
    out_channels, mid = head_weight.shape[0], refine_weight.shape[0]
    out = features.new_empty((batch, out_channels, *image.shape[2:]))
    if out.numel() == 0:
        return out
    # dense copies where needed, held until the kernel returns
    refine_weight, refine_weight_scale, head_weight, head_weight_scale = (
        tensor.contiguous() for tensor in (refine_weight, refine_weight_scale, head_weight, head_weight_scale)
    )
    refine_bias, head_bias = (None if bias is None else bias.contiguous() for bias in (refine_bias, head_bias))
    macs = out.numel() // out_channels * mid * refine_weight.shape[1] * 3**dims
    status = library.monai_qsa_restore_head_int8(
        dims, features.data_ptr(), (ctypes.c_int64 * 5)(*feature_strides), feature_channels, depth, height, width,
        stride, image.data_ptr(), (ctypes.c_int64 * 5)(*image_strides), image.shape[1], batch,
        *[1] * (3 - dims), *image.shape[2:], in_scale,
        in_zero_point, refine_weight.data_ptr(), refine_weight_scale.data_ptr(),
        None if refine_bias is None else refine_bias.data_ptr(), mid, mid_scale, mid_zero_point,
        head_weight.data_ptr(), head_weight_scale.data_ptr(), None if head_bias is None else head_bias.data_ptr(),
        out_channels, out.data_ptr(), INT8_ATTENTION_PATHS[path], _threads_for(macs),
    )  # fmt: skip
    if status == 2:
        raise RuntimeError(f"{_NAME}: this CPU cannot run path {path!r}.")
    if status in (3, 4):
        raise ValueError(_SCALES_MESSAGE.format(("refine_weight_scale", "head_weight_scale")[status - 3]))
    if status == 5:
        raise ValueError(f"{_NAME}: sizes out of the kernel's range (stride, channels).")
    _check_status(status, _NAME)
    return out


def _restore_head_int8_fake(
    features: torch.Tensor, image: torch.Tensor, stride: int, in_scale: float, in_zero_point: int,
    refine_weight: torch.Tensor, refine_weight_scale: torch.Tensor, refine_bias: torch.Tensor | None,
    mid_scale: float, mid_zero_point: int, head_weight: torch.Tensor, head_weight_scale: torch.Tensor,
    head_bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    return features.new_empty((image.shape[0], head_weight.shape[0], *image.shape[2:]))


_define_inference_operator(
    "restore_head_int8(Tensor features, Tensor image, int stride, float in_scale, int in_zero_point, "
    "Tensor refine_weight, Tensor refine_weight_scale, Tensor? refine_bias, float mid_scale, int mid_zero_point, "
    "Tensor head_weight, Tensor head_weight_scale, Tensor? head_bias) -> Tensor",
    restore_head_int8,
    _restore_head_int8_fake,
)


# operations (2 per multiply-accumulate) for torch.utils.flop_counter.FlopCounterMode (count_flops)
@register_flop_formula(torch.ops.monai_qsa.restore_head_int8)
def _flops(features_shape, image_shape, stride, in_scale, in_zero_point, refine_weight_shape,
           refine_weight_scale_shape, refine_bias_shape, mid_scale, mid_zero_point, head_weight_shape,
           head_weight_scale_shape, head_bias_shape, out_shape=None) -> int:  # fmt: skip
    positions = image_shape[0] * math.prod(image_shape[2:])
    mid, in_channels = refine_weight_shape[:2]
    return 2 * positions * mid * (in_channels * 3 ** (len(image_shape) - 2) + head_weight_shape[0])
