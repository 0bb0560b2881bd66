"""Int8 3D convolutions in int8 programs: ``torch.ops.monai_qsa.conv3d_int8`` and the graph pass that puts it in.

``X86InductorQuantizer`` leaves ``conv3d`` unannotated and Inductor lowers int8 convolutions in 2D only, so after
``convert_pt2e`` 3D convolutions hold int8 weights (``quantize_ptq`` stores them per channel) but compute in fp32.
:func:`quantize_conv3d_int8` calibrates the range of each such convolution's input, quantises it to uint8 in the
graph (``quantized_decomposed.quantize_per_tensor``, which Inductor fuses into the op before it) and replaces the
convolution by :func:`conv3d_int8`: oneDNN's int8 convolution (``torch.ops.onednn.qconv3d_pointwise``, int32
accumulation, fp32 output). oneDNN needs its weights packed into an opaque layout that no artifact can store:
artifacts keep the plain int8 weights, and each process packs them on first use (cached per weight tensor).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from monai_qsa.quantization.calibration import calibrate_swaps

__all__ = [
    "InputRangeObserver",
    "check_conv3d_int8",
    "conv3d_int8",
    "conv3d_int8_reference",
    "observe_conv3d",
    "quantize_conv3d_int8",
]

#: uint8 input codes: asymmetric, per tensor (oneDNN's activation format)
UINT8_MAX = 255
#: packed oneDNN weights of this process: id of the weight tensor -> (weak reference to it, packing arguments, packed
#: weight); an entry goes when its tensor does
_PACKED: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def conv3d_int8_reference(
    x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
) -> torch.Tensor:  # fmt: skip
    """The function :func:`conv3d_int8` computes, in fp32 PyTorch operations: the fp32 convolution of the
    dequantised input and weights (the same up to fp32 rounding of the products and sums)."""
    x = (x.to(torch.float32) - x_zero_point) * x_scale
    weight = weight.to(torch.float32) * weight_scale.to(torch.float32).reshape(-1, 1, 1, 1, 1)
    out = F.conv3d(x, weight, bias, stride, padding, dilation)
    return out.contiguous(memory_format=torch.channels_last_3d)


def _onednn_available() -> bool:
    """Whether this torch has oneDNN's int8 3D convolution (x86 builds with MKL-DNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv3d_pointwise")


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification count; 0 for inference tensors (made under ``torch.inference_mode``, e.g.
    constants Inductor folds there), which cannot be modified and keep no count."""
    return 0 if tensor.is_inference() else tensor._version


def _packed_weight(weight: torch.Tensor, weight_scale: torch.Tensor, x_scale: float, x_zero_point: int,
                   stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:  # fmt: skip
    """``weight`` in oneDNN's packed layout, packed once per process and weight tensor; for a 2D convolution when
    ``stride`` has 2 entries (``weight`` is then 1x1x1, packed as 1x1)."""
    arguments = (x_scale, x_zero_point, tuple(stride), tuple(padding), tuple(dilation), _version(weight),
                 id(weight_scale), _version(weight_scale))  # fmt: skip
    key = id(weight)
    cached = _PACKED.get(key)
    if cached is None or cached[0]() is not weight or cached[1] != arguments:
        kernel = weight if len(stride) == 3 else weight[..., 0]
        packed = torch.ops.onednn.qconv_prepack(
            kernel, weight_scale, x_scale, x_zero_point, stride, padding, dilation, 1, None
        )
        cached = _PACKED[key] = (weakref.ref(weight, lambda _: _PACKED.pop(key, None)), arguments, packed)
    return cached[2]


def _pointwise(weight: torch.Tensor, stride: list[int], padding: list[int]) -> bool:
    """Whether the convolution is 1x1x1 with stride 1 and no padding: a 1x1 convolution of the (D*H, W) plane."""
    return tuple(weight.shape[2:]) == (1, 1, 1) and list(stride) == [1, 1, 1] and list(padding) == [0, 0, 0]


@torch.library.custom_op("monai_qsa::conv3d_int8", mutates_args=())
def conv3d_int8(
    x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
) -> torch.Tensor:  # fmt: skip
    """3D convolution of a uint8 input and per-channel int8 weights, int32 accumulation, fp32 output (channels-last).

    Args:
        x: the quantised input ``(B, C, D, H, W)``, uint8: ``x_fp32 = (x - x_zero_point) * x_scale``.
        x_scale: the input's scale.
        x_zero_point: the input's zero point, in ``[0, 255]``.
        weight: ``(C_out, C, kd, kh, kw)`` int8, symmetric per output channel.
        weight_scale: ``(C_out,)`` fp32 scales of the weights.
        bias: fp32 ``(C_out,)`` or None.
        stride: 3 strides.
        padding: 3 paddings.
        dilation: 3 dilations.

    Returns:
        the fp32 output, channels-last; oneDNN's int8 convolution on x86 CPUs (its 2D convolution for 1x1x1 kernels
        of stride 1 without padding), else :func:`conv3d_int8_reference`.

    Raises:
        ValueError: arguments that do not fit together (a model file chooses them), see :func:`check_conv3d_int8`.
    """
    check_conv3d_int8(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation)
    if x.device.type != "cpu" or not _onednn_available():
        return conv3d_int8_reference(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
    if not _pointwise(weight, stride, padding):
        packed = _packed_weight(weight, weight_scale, x_scale, x_zero_point, stride, padding, dilation)
        return torch.ops.onednn.qconv3d_pointwise(
            x, x_scale, x_zero_point, packed, weight_scale, zero_points, bias, stride, padding, dilation, 1, 1.0, 0,
            torch.float32, "none", [], "",
        )  # fmt: skip
    # 1x1x1: oneDNN's 2D int8 convolution of the (D*H, W) plane, a view of the channels-last input. Its 3D one is
    # about 10x slower when the input zero point is 0 (after a ReLU), by a cost that grows with the weight (measured
    # with torch 2.13: 1.1 ms instead of 0.1 ms for 128 -> 384 channels at 2x2x2; 0.06 ms in 2D), which made the
    # attention projections of a 3D SAUNet's coarse levels a third of its int8 time
    batch, _, depth, height, width = x.shape
    plane = x.permute(0, 2, 3, 4, 1).reshape(batch, depth * height, width, -1).permute(0, 3, 1, 2)
    packed = _packed_weight(weight, weight_scale, x_scale, x_zero_point, [1, 1], [0, 0], [1, 1])
    out = torch.ops.onednn.qconv_pointwise(
        plane, x_scale, x_zero_point, packed, weight_scale, zero_points, bias, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
        torch.float32, "none", [], "",
    )  # fmt: skip
    return out.permute(0, 2, 3, 1).reshape(batch, depth, height, width, -1).permute(0, 4, 1, 2, 3)


def check_conv3d_int8(
    x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the argument unless :func:`conv3d_int8`'s arguments fit together: oneDNN trusts
    them, and an artifact's graph chooses them."""
    channels = x.shape[1] if x.ndim > 1 else None
    out_channels = weight.shape[0] if weight.ndim else None
    problems = [
        f"x must be a 5-D uint8 tensor, got {x.dtype} {tuple(x.shape)}" * (x.dtype != torch.uint8 or x.ndim != 5),
        f"weight must be int8 (C_out, {channels}, kd, kh, kw), got {weight.dtype} {tuple(weight.shape)}"
        * (weight.dtype != torch.int8 or weight.ndim != 5 or weight.shape[1] != channels),
        f"weight_scale must be fp32 ({out_channels},), got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        * (weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (out_channels,)),
        f"bias must be None or fp32 ({out_channels},)"
        * (bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out_channels,))),
        f"x_scale must be positive and finite, got {x_scale}" * (not 0 < x_scale < float("inf")),
        f"x_zero_point must be in [0, 255], got {x_zero_point}" * (not 0 <= x_zero_point <= UINT8_MAX),
    ]
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        problems.append(
            f"{name} must be 3 integers in [{low}, 1024], got {list(values)}"
            * (len(values) != 3 or not all(low <= value <= 1024 for value in values))
        )
    problems = [problem for problem in problems if problem]
    if problems:
        raise ValueError("conv3d_int8: " + "; ".join(problems) + ".")


@conv3d_int8.register_fake
def _(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation) -> torch.Tensor:
    check_conv3d_int8(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation)
    return conv3d_int8_reference(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation)


# operations (2 per multiply-accumulate) for torch.utils.flop_counter.FlopCounterMode (count_flops), which cannot
# see into the operator: those of the fp32 convolution it replaces
@register_flop_formula(torch.ops.monai_qsa.conv3d_int8)
def _flops(x_shape, x_scale, x_zero_point, weight_shape, weight_scale_shape, bias_shape, stride, padding, dilation,
           out_shape) -> int:  # fmt: skip
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


class InputRangeObserver(torch.nn.Module):
    """Records the smallest and largest value (``low``, ``high``) of the tensors it sees, and passes them on."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.low = torch.minimum(self.low, x.detach().min().float())
        self.high = torch.maximum(self.high, x.detach().max().float())
        return x

    def quantization(self) -> tuple[float, int]:
        """The uint8 scale and zero point of the range seen (0 included), as oneDNN takes them."""
        low, high = float(self.low), float(self.high)
        scale = max((high - low) / UINT8_MAX, 1e-8)
        return scale, int(min(max(round(-low / scale), 0), UINT8_MAX))


def _weight_only_conv3d(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an ungrouped ``conv3d`` whose weight is a per-channel int8 tensor dequantised in the graph
    (``quantize_ptq``'s weight-only form), dequantised along the output channels."""
    if node.op != "call_function" or node.target is not torch.ops.aten.conv3d.default:
        return False  # (quantized_decomposed is registered once the graph holds any of its operators)
    weight = node.args[1]
    grouped = len(node.args) > 6 and node.args[6] != 1
    return (
        not grouped
        and isinstance(weight, torch.fx.Node)
        and weight.target is torch.ops.quantized_decomposed.dequantize_per_channel.default
        and all(isinstance(arg, torch.fx.Node) and arg.op == "get_attr" for arg in weight.args[:3])
        and weight.args[3] == 0
    )


def _triple(value: list[int] | int) -> list[int]:
    value = [value] if isinstance(value, int) else list(value)
    return value * 3 if len(value) == 1 else value


def quantize_conv3d_int8(
    program: torch.fx.GraphModule,
    calibration_data: Iterable,
    num_batches: int | None = None,
    image_key: str = "image",
    inferer: Callable | None = None,
) -> int:
    """Replace every weight-only int8 ``conv3d`` of ``program`` (see :func:`_weight_only_conv3d`) by
    :func:`conv3d_int8` with a calibrated uint8 input, in place.

    Observers (:class:`InputRangeObserver`) are inserted before each such convolution, the calibration batches are
    run, and each convolution's input is then quantised in the graph with the observed range; the observers are
    removed. ``quantize_ptq`` runs this and the attention's calibration in one pass (:func:`observe_conv3d`).

    Args:
        program: an int8 graph module (``quantize_ptq(...).program``, after its weight-only pass).
        calibration_data: as for ``quantize_ptq``: tensors, ``(input, target)`` tuples or MONAI dict batches.
        num_batches: calibrate on at most this many batches (default: all).
        image_key: the input's key in dict batches.
        inferer: calibrate through ``inferer(batch, program)`` (e.g. a sliding window) instead of ``program(batch)``.

    Returns:
        the number of convolutions replaced.

    Raises:
        ValueError: no calibration batch.
    """
    return calibrate_swaps(program, [observe_conv3d(program)], calibration_data, num_batches, image_key, inferer)[0]


def observe_conv3d(program: torch.fx.GraphModule) -> Callable[[bool], int] | None:
    """Insert an :class:`InputRangeObserver` before each weight-only int8 ``conv3d`` of ``program`` (None if it has
    none); after calibration, ``finish(True)`` swaps them for :func:`conv3d_int8`, ``finish(False)`` only removes
    the observers. ``finish`` returns the number of convolutions swapped."""
    nodes = [node for node in program.graph.nodes if _weight_only_conv3d(node)]
    if not nodes:
        return None
    names = []
    for index, node in enumerate(nodes):
        name = f"monai_qsa_conv3d_observer_{index}"
        program.add_submodule(name, InputRangeObserver())
        with program.graph.inserting_before(node):
            observed = program.graph.call_module(name, (node.args[0],))
        node.replace_input_with(node.args[0], observed)
        names.append(name)

    def finish(swap: bool) -> int:
        quantizations = [program.get_submodule(name).quantization() for name in names] if swap else []
        for node, name in zip(nodes, names):
            observed = node.args[0]
            node.replace_input_with(observed, observed.args[0])
            program.graph.erase_node(observed)
            program.delete_submodule(name)
        for node, (scale, zero_point) in zip(nodes, quantizations):
            _swap(program.graph, node, scale, zero_point)
        program.graph.eliminate_dead_code()
        return len(quantizations)

    return finish


def _swap(graph: torch.fx.Graph, node: torch.fx.Node, scale: float, zero_point: int) -> None:
    """Replace the weight-only ``conv3d`` ``node`` by ``conv3d_int8`` of its input quantised to uint8."""
    defaults = [None, None, None, [1], [0], [1]]  # conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1)
    x, weight, bias, stride, padding, dilation = list(node.args[:6]) + defaults[len(node.args[:6]) :]
    weight_int8, weight_scale = weight.args[:2]
    with graph.inserting_before(node):
        quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default  # registered by torchao's pt2e
        quantized = graph.call_function(quantize, (x, scale, zero_point, 0, UINT8_MAX, torch.uint8))
        int8 = graph.call_function(
            torch.ops.monai_qsa.conv3d_int8.default,
            (quantized, scale, zero_point, weight_int8, weight_scale, bias, _triple(stride), _triple(padding),
             _triple(dilation)),
        )  # fmt: skip
    int8.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
    node.replace_all_uses_with(int8)
    graph.erase_node(node)
