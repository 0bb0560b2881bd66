"""Int8 neighbourhood attention: ``torch.ops.monai_qsa.local_attention_int8``.

The int8 counterpart of ``torch.ops.monai_qsa.local_attention``: queries, keys and values are quantised to int8
with per-tensor symmetric scales (from calibration, passed as arguments); the logits ``q . k`` are int8 dot
products accumulated in int32, the relative-position terms and the softmax fp32, the weighted sum uint8 weights x
int8 values accumulated in int32; the output is fp32. One function, several implementations:

- the C kernel ``local_attention_int8.c``, built once per machine by
  :func:`~monai_qsa.networks.blocks.local_attention.compiled_library`, with one path per instruction set chosen at
  run time from the CPU: ``avx512_vnni`` and ``avx_vnni`` (``vpdpbusd``), ``avx2`` (``vpmaddwd``, exact) and
  ``scalar`` (plain C). Their integer sums are exact: all give the same output.
- :func:`local_attention_int8_reference`, PyTorch operations (used without a C compiler, with the warning of the
  fp32 kernel, or with ``MONAI_QSA_FUSED_ATTENTION=0``).

``torch.ops.monai_qsa.projected_local_attention_int8`` is the same attention with the layer's query/key/value
projection (its 1x1(x1) convolution) computed by the kernel too, from the layer's input: in int8 programs it replaces
the projection's int8 convolution and the attention (two operators, and a projection written to memory and read back,
become one; most of a small network's time is per-operator cost). The projection is fp32, summed over the input
channels in their order (:func:`project_in_order`); the attention is the int8 one above.

``MONAI_QSA_INT8_ATTENTION_PATH`` (``auto``, ``avx512_vnni``, ``avx_vnni``, ``avx2``, ``scalar``, ``torch``) forces a
path, e.g. to test the AVX2 path on a VNNI machine; a path this CPU cannot run is an error.

:func:`monai_qsa.quantization.int8_attention.quantize_attention_int8` puts the operator into int8 programs.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

# the private helpers are shared with the fp32 operator on purpose (same kernel layouts, thread policy and status
# codes); they stay private to the two sibling modules of the attention operators
from monai_qsa.networks.blocks.local_attention import (
    _check_status,
    _forward_macs,
    _kernel_shape,
    _thread_count,
    check_attention_arguments,
    compiled_library,
    local_attention_reference,
    neighbourhood_padding,
)

__all__ = [
    "INT8_ATTENTION_PATHS",
    "int8_attention_paths",
    "local_attention_int8_reference",
    "project_in_order",
    "projected_local_attention_int8_reference",
    "quantize_symmetric",
    "symmetric_scale",
]

_SOURCE = Path(__file__).with_name("local_attention_int8.c")
#: path names and their numbers in the C source (``auto``: the fastest this CPU runs; ``torch``: no C kernel)
INT8_ATTENTION_PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx_vnni": 3, "avx512_vnni": 4, "torch": None}
PATH_VARIABLE = "MONAI_QSA_INT8_ATTENTION_PATH"
_KERNEL_NAME = "monai_qsa int8 local attention kernel"
#: the operator with the projection fused in, as its argument errors name it
_PROJECTED = "projected_local_attention_int8"
#: the C kernel keeps the queries of up to this many channels per head in registers (MAX_GROUPS 64 of 4 channels)
_MAX_HEAD_CHANNELS = 256
#: largest magnitude of a quantised value: symmetric int8, -128 unused so that negation is exact
INT8_MAX = 127


def symmetric_scale(amax: float | torch.Tensor) -> float:
    """The int8 scale that maps ``[-amax, amax]`` onto ``[-127, 127]`` (e.g. from a calibration observer's min/max:
    ``amax = max(-min_val, max_val)``)."""
    amax = float(amax)
    if not 0 < amax < float("inf"):
        raise ValueError(f"amax must be a positive finite number to define an int8 scale, got {amax}.")
    return amax / INT8_MAX


def quantize_symmetric(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``round(x * (1 / scale))`` (ties to even, the inverse in fp32 as in the C kernel) clamped to ``[-127, 127]``,
    as int8."""
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x * inverse), -INT8_MAX, INT8_MAX).to(torch.int8)


def local_attention_int8_reference(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float, q_scale: float,
    k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    """The int8 attention in PyTorch operations, the same function as the C kernel.

    Queries, keys, values and the relative-position table (its own scale, :func:`_table_scale`) are quantised to
    int8 (:func:`quantize_symmetric`); the logits are the fp32 logits of the dequantised queries, keys and table
    (exact: their integer products and sums are exact in fp32); the weights are
    ``round(255 * exp(logit - max))`` (uint8, 0 outside the image) and the output is the weighted sum of the int8
    values divided by the sum of the weights, times ``v_scale``.

    Args:
        qkv: queries, keys and values of every head, ``(B, 3, heads, d_head, *S)``, fp32.
        table: relative-position table ``(spatial_dims, kernel_size, d_head)``.
        kernel_size: neighbourhood side length (odd).
        dilation: spacing between neighbours.
        scale: factor of the logits, ``1 / sqrt(d_head)``.
        q_scale: int8 scale of the queries (before ``scale``), see :func:`symmetric_scale`.
        k_scale: int8 scale of the keys.
        v_scale: int8 scale of the values.

    Returns:
        the output ``(B, heads, d_head, *S)``, fp32.
    """
    q, k, v = qkv.unbind(1)
    q = quantize_symmetric(q, q_scale).to(qkv.dtype) * q_scale
    k = quantize_symmetric(k, k_scale).to(qkv.dtype) * k_scale
    v = quantize_symmetric(v, v_scale).to(qkv.dtype)
    table_scale = _table_scale(table)
    table = quantize_symmetric(table, table_scale).to(qkv.dtype) * table_scale
    attention = local_attention_reference(torch.stack((q, k, v), 1), table, kernel_size, dilation, scale)[1]
    # softmax / its max = exp(logit - max); (B, heads, k^d, *S)
    weights = torch.floor(attention / attention.amax(2, keepdim=True) * 255 + 0.5)
    dims = table.shape[0]
    spatial = v.shape[3:]
    v_pad = F.pad(v, [neighbourhood_padding(kernel_size, dilation)] * (2 * dims))
    out = torch.zeros_like(v)
    for index, offset in enumerate(itertools.product(range(kernel_size), repeat=dims)):
        window = (Ellipsis,) + tuple(slice(i * dilation, i * dilation + size) for i, size in zip(offset, spatial))
        out += weights[:, :, index : index + 1] * v_pad[window]  # (B, heads, 1, *S) * (B, heads, d_head, *S)
    return out * (v_scale / weights.sum(2, keepdim=True))


def project_in_order(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1(x1) convolution ``bias + weight x`` summed over the input channels in their order, one rounding per
    product and per sum: the C kernel's projection, to the bit (a convolution library sums in another order).

    Args:
        x: input ``(B, in_channels, *S)``.
        weight: ``(out_channels, in_channels)`` or a convolution's ``(out_channels, in_channels, 1, 1[, 1])``.
        bias: ``(out_channels,)`` or None.

    Returns:
        ``(B, out_channels, *S)``.
    """
    weight = weight.reshape(weight.shape[0], weight.shape[1], *(1,) * (x.ndim - 2))  # broadcast over positions
    out = x.new_zeros((x.shape[0], weight.shape[0], *x.shape[2:]))
    if bias is not None:
        out = out + bias.reshape(-1, *(1,) * (x.ndim - 2))
    for channel in range(x.shape[1]):
        out = out + weight[:, channel] * x[:, channel : channel + 1]
    return out


def projected_local_attention_int8_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, kernel_size: int,
    dilation: int, scale: float, q_scale: float, k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    """:func:`local_attention_int8_reference` of the projection :func:`project_in_order` gives.

    Args:
        x: the layer's input ``(B, in_channels, *S)``, fp32.
        weight: the projection's weight ``(3 * heads * d_head, in_channels[, 1, 1[, 1]])``.
        bias: its bias ``(3 * heads * d_head,)`` or None.
        table, kernel_size, dilation, scale, q_scale, k_scale, v_scale: as :func:`local_attention_int8_reference`.

    Returns:
        the output ``(B, heads, d_head, *S)``, fp32.
    """
    qkv = project_in_order(x, weight, bias)
    qkv = qkv.reshape(x.shape[0], 3, -1, table.shape[-1], *x.shape[2:])
    return local_attention_int8_reference(qkv, table, kernel_size, dilation, scale, q_scale, k_scale, v_scale)


def _table_scale(table: torch.Tensor) -> float:
    """The int8 scale of the relative-position table, from its own largest magnitude (1 for an all-zero table)."""
    amax = float(table.detach().abs().max()) if table.numel() else 0.0
    return 1.0 if amax == 0 else symmetric_scale(amax)  # NaN and infinity: ValueError, as in the C kernel


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels (the attention's and :mod:`~monai_qsa.networks.blocks.restore_head_int8`'s) with their
    argument types, built on first use; None (one warning) if unavailable."""
    library = compiled_library(_SOURCE)
    if library is None:
        return None
    library.monai_qsa_int8_path_supported.argtypes = [ctypes.c_int]
    library.monai_qsa_int8_path_supported.restype = ctypes.c_int
    attend = library.monai_qsa_local_attention_int8
    attend.argtypes = (
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
         ctypes.c_double] + [ctypes.c_float] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_int] * 5
        + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    )  # fmt: skip
    attend.restype = ctypes.c_int
    # the resolution restore and head of restore_head_int8.py
    restore = library.monai_qsa_restore_head_int8
    int64, pointer, strides = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    restore.argtypes = (
        [ctypes.c_int, pointer, strides] + [int64] * 5 + [pointer, strides] + [int64] * 5
        + [ctypes.c_double, ctypes.c_int]
        + [pointer] * 3 + [int64, ctypes.c_double, ctypes.c_int] + [pointer] * 3 + [int64, pointer] + [ctypes.c_int] * 2
    )  # fmt: skip
    restore.restype = ctypes.c_int
    return library


def int8_attention_paths() -> list[str]:
    """The paths this machine runs, fastest C path first, ``torch`` last (``auto`` excluded)."""
    library = _library()
    native = ("avx512_vnni", "avx_vnni", "avx2", "scalar") if library is not None else ()
    return [name for name in native if library.monai_qsa_int8_path_supported(INT8_ATTENTION_PATHS[name])] + ["torch"]


def _requested_path() -> str:
    """The path named by ``$MONAI_QSA_INT8_ATTENTION_PATH`` (default ``auto``), checked."""
    path = os.environ.get(PATH_VARIABLE, "auto")
    if path not in INT8_ATTENTION_PATHS:
        raise ValueError(
            f"{PATH_VARIABLE}={path!r} is not a path of the int8 attention; "
            f"choose one of {sorted(INT8_ATTENTION_PATHS)}."
        )
    if path not in ("auto", "torch") and path not in int8_attention_paths():
        raise ValueError(
            f"{PATH_VARIABLE}={path!r}: this machine cannot run that path (it runs {int8_attention_paths()}; "
            "without a C compiler only 'torch')."
        )
    return path


def _run_kernel(library: ctypes.CDLL, path: int, qkv: torch.Tensor, table: torch.Tensor, kernel_size: int,
                dilation: int, scale: float, scales: tuple[float, float, float],
                projection: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:  # fmt: skip
    """Run the C kernel on path number ``path``: one call quantises the projection and the table and attends
    (the per-call cost matters: the coarse levels of a network are a few hundred positions); ``scales``: the int8
    scales of queries, keys and values. With ``projection`` (weight ``(3 heads d_head, in_channels)``, bias), ``qkv``
    is the layer's input ``(B, in_channels, *S)``, projected by the kernel."""
    dims = table.shape[0]
    head_channels = table.shape[-1]
    if projection is None:
        batch, _, heads, _, *spatial = qkv.shape
        if qkv.stride(2) != head_channels * qkv.stride(3):  # heads and their channels not one evenly strided axis
            qkv = qkv.contiguous()
        part_channel = [qkv.stride(1), qkv.stride(3)]
        weight = bias = None
        in_channels = 0
    else:
        batch, in_channels, *spatial = qkv.shape
        weight, bias = projection
        heads = weight.shape[0] // (3 * head_channels)
        part_channel = [0, qkv.stride(1)]
        weight = weight.reshape(weight.shape[0], in_channels).contiguous()
        bias = None if bias is None else bias.contiguous()
    (depth, height, width), _ = _kernel_shape(dims, spatial, kernel_size)
    spatial_strides = ([0] + list(qkv.stride()[-2:])) if dims == 2 else list(qkv.stride()[-3:])
    strides = (ctypes.c_int64 * 6)(qkv.stride(0), *part_channel, *spatial_strides)
    table = table.contiguous()
    out = qkv.new_empty((batch, heads, head_channels, *spatial))
    q_scale, k_scale, v_scale = scales
    status = library.monai_qsa_local_attention_int8(
        qkv.data_ptr(), strides, table.data_ptr(), out.data_ptr(), scale * q_scale * k_scale, scale * q_scale,
        q_scale, k_scale, v_scale, batch, heads, head_channels, depth, height, width, dims, kernel_size, dilation,
        path, _thread_count((batch, 3, heads, head_channels, *spatial), kernel_size),
        None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(), in_channels,
    )  # fmt: skip
    if status == 2:
        raise RuntimeError(f"{_KERNEL_NAME}: this CPU cannot run path number {path}.")
    if status == 3:
        raise ValueError(f"{_KERNEL_NAME}: the relative-position table holds a value that is not finite.")
    _check_status(status, _KERNEL_NAME)
    return out


def local_attention_int8(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float, q_scale: float,
    k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Inference-only neighbourhood attention in int8: :func:`local_attention_int8_reference`'s output, computed by
    the C kernel (fastest path of this CPU, or ``$MONAI_QSA_INT8_ATTENTION_PATH``) for fp32 CPU tensors. Arguments
    as :func:`local_attention_int8_reference`; the projection may be in any memory layout. Raises ``ValueError`` for
    mismatched arguments or a scale that is not positive and finite
    (:func:`~monai_qsa.networks.blocks.local_attention.check_attention_arguments`): a model file chooses them.
    """
    check_attention_arguments(
        "local_attention_int8", qkv, table, kernel_size, dilation, scale,
        int8_scales={"q_scale": q_scale, "k_scale": k_scale, "v_scale": v_scale},
    )  # fmt: skip
    path = _requested_path()
    library = None if path == "torch" else _library()
    if library is None or qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.shape[3] > _MAX_HEAD_CHANNELS:
        return local_attention_int8_reference(qkv, table, kernel_size, dilation, scale, q_scale, k_scale, v_scale)
    scales = (q_scale, k_scale, v_scale)
    return _run_kernel(library, INT8_ATTENTION_PATHS[path], qkv, table, kernel_size, dilation, scale, scales)


def _local_attention_int8_fake(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float, q_scale: float,
    k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    return qkv.new_empty(qkv.shape[:1] + qkv.shape[2:])


def _projection_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor
) -> tuple[int, ...]:
    """The shape ``(B, 3, heads, d_head, *S)`` of the projection of ``x`` by ``weight``; ``ValueError`` naming the
    argument if ``x``, ``weight``, ``bias`` and ``table`` do not fit together (a model file chooses them)."""
    where = f"monai_qsa.{_PROJECTED}"
    if not isinstance(table, torch.Tensor) or table.ndim != 3 or table.shape[0] not in (2, 3):
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{where}: table must be (spatial_dims, kernel_size, d_head) of 2 or 3 dims, got {shape}.")
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if name == "bias" and tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.dtype != table.dtype:
            raise ValueError(f"{where}: {name} must be a dense tensor of the table's dtype ({table.dtype}).")
        if tensor.device != table.device:
            raise ValueError(f"{where}: {name} is on {tensor.device}, the table on {table.device}.")
    if x.ndim != table.shape[0] + 2:
        raise ValueError(
            f"{where}: x must be (B, in_channels, *spatial) with {table.shape[0]} spatial dimensions (the table's), "
            f"got shape {tuple(x.shape)}."
        )
    head_channels = table.shape[-1]
    rows = weight.shape[0] if weight.ndim >= 2 else 0
    if (
        weight.ndim not in (2, x.ndim)
        or weight.shape[1] != x.shape[1]
        or any(size != 1 for size in weight.shape[2:])
        or head_channels == 0
        or rows == 0
        or rows % (3 * head_channels)
    ):
        raise ValueError(
            f"{where}: weight must be (3 * heads * d_head, in_channels) or a 1x1(x1) convolution's weight, with "
            f"in_channels = {x.shape[1]} (x's) and d_head = {head_channels} (the table's), got {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"{where}: bias must have shape ({rows},) (weight's rows), got {tuple(bias.shape)}.")
    return (x.shape[0], 3, rows // (3 * head_channels), head_channels, *x.shape[2:])


def projected_local_attention_int8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, kernel_size: int,
    dilation: int, scale: float, q_scale: float, k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    """The int8 attention of the projection ``bias + weight x``, both computed by the C kernel (fp32 CPU tensors):
    :func:`projected_local_attention_int8_reference`'s output, to the bit. Arguments as
    :func:`projected_local_attention_int8_reference`; ``x`` may be in any memory layout. Raises ``ValueError`` for
    mismatched arguments or a scale that is not positive and finite.
    """
    shape = _projection_shape(x, weight, bias, table)
    check_attention_arguments(
        _PROJECTED, x.new_zeros(()).expand(shape), table, kernel_size, dilation, scale,
        int8_scales={"q_scale": q_scale, "k_scale": k_scale, "v_scale": v_scale},
    )  # fmt: skip
    path = _requested_path()
    library = None if path == "torch" else _library()
    if library is None or x.device.type != "cpu" or x.dtype != torch.float32 or shape[3] > _MAX_HEAD_CHANNELS:
        return projected_local_attention_int8_reference(
            x, weight, bias, table, kernel_size, dilation, scale, q_scale, k_scale, v_scale
        )
    scales = (q_scale, k_scale, v_scale)
    return _run_kernel(
        library, INT8_ATTENTION_PATHS[path], x, table, kernel_size, dilation, scale, scales, (weight, bias)
    )


def _projected_local_attention_int8_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, kernel_size: int,
    dilation: int, scale: float, q_scale: float, k_scale: float, v_scale: float,
) -> torch.Tensor:  # fmt: skip
    batch, _, heads, head_channels, *spatial = _projection_shape(x, weight, bias, table)
    return x.new_empty((batch, heads, head_channels, *spatial))


_LIBRARY = torch.library.Library("monai_qsa", "FRAGMENT")
_SCALARS = "int kernel_size, int dilation, float scale, float q_scale, float k_scale, float v_scale"


def _define_inference_operator(schema: str, implementation: Callable, fake: Callable) -> None:
    """Define ``monai_qsa::<schema>`` on PyTorch's dispatcher: ``implementation`` for every device, ``fake`` for
    tracing (shapes only). The int8 operators serve inference only, so they skip ``torch.library.custom_op``, whose
    Python layers for autograd and for keeping Dynamo out cost about 15 µs per call (measured: docs/int8_attention.md)
    where a small network's layers take 40-200 µs each. ``flexible_layout``: inputs are taken in the layout they have
    (channels-last after int8 convolutions)."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema, tags=(torch.Tag.flexible_layout,))
    _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"monai_qsa::{name}", fake, lib=_LIBRARY)


_define_inference_operator(
    f"local_attention_int8(Tensor qkv, Tensor table, {_SCALARS}) -> Tensor",
    local_attention_int8,
    _local_attention_int8_fake,
)
_define_inference_operator(
    f"{_PROJECTED}(Tensor x, Tensor weight, Tensor? bias, Tensor table, {_SCALARS}) -> Tensor",
    projected_local_attention_int8,
    _projected_local_attention_int8_fake,
)


# operations (2 per multiply-accumulate, integer or float) for torch.utils.flop_counter.FlopCounterMode (count_flops),
# which cannot see into the kernel: the same as the fp32 operator's
@register_flop_formula(torch.ops.monai_qsa.local_attention_int8)
def _flops(qkv_shape, table_shape, kernel_size: int, dilation: int, scale: float, q_scale: float, k_scale: float,
           v_scale: float, out_shape=None) -> int:  # fmt: skip
    return 2 * _forward_macs(qkv_shape, kernel_size)


@register_flop_formula(torch.ops.monai_qsa.projected_local_attention_int8)
def _projected_flops(x_shape, weight_shape, bias_shape, table_shape, kernel_size: int, dilation: int, scale: float,
                     q_scale: float, k_scale: float, v_scale: float, out_shape=None) -> int:  # fmt: skip
    head_channels = table_shape[-1]
    qkv_shape = (x_shape[0], 3, weight_shape[0] // (3 * head_channels), head_channels, *x_shape[2:])
    projection_macs = math.prod(qkv_shape) * x_shape[1]
    return 2 * (projection_macs + _forward_macs(qkv_shape, kernel_size))
