"""CUDA kernels (Triton) of the neighbourhood attention: the GPU implementation of the training operators
``monai_qsa::local_attention_forward`` / ``local_attention_backward`` and of the inference operator
``monai_qsa::local_attention`` (dispatched from ``local_attention._fused_kernels``).

Same function as :func:`~monai_qsa.networks.blocks.local_attention.local_attention_reference`: 2D and 3D, any odd
kernel size, dilation, heads, the factorised relative-position table, neighbours outside the image masked out of the
softmax. fp32, fp16 and bf16 inputs; every sum is accumulated in fp32.

- forward: one program per ``BLOCK_P`` positions of one ``(batch, head)`` plane; an online softmax over the
  ``k^d`` offsets keeps the running maximum, sum and weighted sum of values in registers, so nothing of size
  ``k^d x image`` reaches global memory. It saves each position's log-sum-exp for the backward pass.
- backward, two kernels: one per query block (``dq``, the table gradient's per-block partial sums, and the fp32
  log-sum-exp and ``delta = g . out`` for the second kernel), one per key block gathering ``dk`` and ``dv`` from the
  ``k^d`` queries that attend to each key (no atomics: deterministic).

Triton is optional and imported on first use (``triton_available``): the package imports and runs without it, and
CUDA tensors then take the PyTorch reference. ``TRITON_INTERPRET=1``, set before Triton is first imported (i.e. in
the environment of the process: ``torch.utils.flop_counter`` imports it), runs the kernels through Triton's
interpreter on CPU tensors (numpy): that is how the tests check their numerics on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import NamedTuple

import torch

__all__ = ["triton_available", "triton_backward", "triton_forward", "triton_supports"]

_LOG2E = math.log2(math.e)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``triton.language``, bound on first use by :func:`_compiled`; the kernels below refer to it as a global, which is
#: how Triton resolves it when it compiles (or interprets) them
tl = None


def _forward_kernel(
    qkv, rel, out, lse,
    heads, channels, depth, height, width, dilation, qk_scale,
    s_b, s_part, s_head, s_chan, s_z, s_y, s_x,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, SAVE_LSE: tl.constexpr,
):  # fmt: skip
    """Output (and log-sum-exp) of ``BLOCK_P`` positions of one plane: online softmax over the offsets, base 2."""
    block, plane = tl.program_id(0), tl.program_id(1)
    batch, head = plane // heads, plane % heads
    image = depth * height * width
    pos = block * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pos < image
    x, y, z = pos % width, (pos // width) % height, pos // (width * height)
    chan = tl.arange(0, BLOCK_D)
    chan_ok = chan < channels
    tile_ok = inside[:, None] & chan_ok[None, :]
    chan_off = (chan * s_chan)[None, :]
    base = qkv + batch.to(tl.int64) * s_b + head.to(tl.int64) * s_head
    q = tl.load(base + (z * s_z + y * s_y + x * s_x)[:, None] + chan_off, mask=tile_ok, other=0.0).to(tl.float32)
    q = q * qk_scale
    m = tl.full([BLOCK_P], -1e30, tl.float32)  # finite: exp2(m - m_new) stays defined while every logit is -inf
    total = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for iz in range(KD):
        nz = z + (iz - KD // 2) * dilation
        r_z = tl.load(rel + iz * channels + chan, mask=chan_ok, other=0.0)
        for iy in range(KH):
            ny = y + (iy - KH // 2) * dilation
            r_zy = r_z + tl.load(rel + (KD + iy) * channels + chan, mask=chan_ok, other=0.0)
            ok_zy = inside & (nz >= 0) & (nz < depth) & (ny >= 0) & (ny < height)
            for ix in range(KW):
                nx = x + (ix - KW // 2) * dilation
                ok = ok_zy & (nx >= 0) & (nx < width)
                r = r_zy + tl.load(rel + (KD + KH + ix) * channels + chan, mask=chan_ok, other=0.0)
                there = base + (nz * s_z + ny * s_y + nx * s_x)[:, None] + chan_off
                mask = ok[:, None] & chan_ok[None, :]
                key = tl.load(there + s_part, mask=mask, other=0.0).to(tl.float32)
                value = tl.load(there + 2 * s_part, mask=mask, other=0.0).to(tl.float32)
                logit = tl.where(ok, tl.sum(q * (key + r[None, :]), axis=1), float("-inf"))
                m_new = tl.maximum(m, logit)
                alpha = tl.exp2(m - m_new)
                weight = tl.exp2(logit - m_new)
                total = total * alpha + weight
                acc = acc * alpha[:, None] + weight[:, None] * value
                m = m_new
    total = tl.where(total > 0, total, 1.0)  # positions past the image's end only
    dense = plane.to(tl.int64) * channels * image + (chan * image)[None, :] + pos[:, None]
    tl.store(out + dense, (acc / total[:, None]).to(out.dtype.element_ty), mask=tile_ok)
    if SAVE_LSE:
        natural = tl.where(inside, (m + tl.log2(total)) * 0.6931471805599453, 0.0)  # ln 2: back from base 2
        tl.store(lse + plane.to(tl.int64) * image + pos, natural.to(lse.dtype.element_ty), mask=inside)


def _backward_query_kernel(
    qkv, rel, grad_out, out, lse, grad_qkv, lse2_buf, delta_buf, grad_rel_part,
    heads, channels, depth, height, width, dilation, scale, qk_scale,
    s_b, s_part, s_head, s_chan, s_z, s_y, s_x,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, RECOMPUTE_LSE: tl.constexpr,
):  # fmt: skip
    """Per query block: ``dq``, the table gradient's partial sums per offset, and the fp32 base-2 log-sum-exp and
    ``delta = g . out`` of each position for :func:`_backward_key_kernel`."""
    block, plane = tl.program_id(0), tl.program_id(1)
    batch, head = plane // heads, plane % heads
    image = depth * height * width
    pos = block * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pos < image
    x, y, z = pos % width, (pos // width) % height, pos // (width * height)
    chan = tl.arange(0, BLOCK_D)
    chan_ok = chan < channels
    tile_ok = inside[:, None] & chan_ok[None, :]
    chan_off = (chan * s_chan)[None, :]
    base = qkv + batch.to(tl.int64) * s_b + head.to(tl.int64) * s_head
    q_raw = tl.load(base + (z * s_z + y * s_y + x * s_x)[:, None] + chan_off, mask=tile_ok, other=0.0)
    q_raw = q_raw.to(tl.float32)
    q = q_raw * qk_scale
    dense = plane.to(tl.int64) * channels * image + (chan * image)[None, :] + pos[:, None]
    g = tl.load(grad_out + dense, mask=tile_ok, other=0.0).to(tl.float32)
    delta = tl.sum(g * tl.load(out + dense, mask=tile_ok, other=0.0).to(tl.float32), axis=1)
    per_position = plane.to(tl.int64) * image + pos
    if RECOMPUTE_LSE:  # half-precision inputs: the saved log-sum-exp was rounded to their precision
        m = tl.full([BLOCK_P], -1e30, tl.float32)
        total = tl.zeros([BLOCK_P], tl.float32)
        for iz in range(KD):
            nz = z + (iz - KD // 2) * dilation
            r_z = tl.load(rel + iz * channels + chan, mask=chan_ok, other=0.0)
            for iy in range(KH):
                ny = y + (iy - KH // 2) * dilation
                r_zy = r_z + tl.load(rel + (KD + iy) * channels + chan, mask=chan_ok, other=0.0)
                ok_zy = inside & (nz >= 0) & (nz < depth) & (ny >= 0) & (ny < height)
                for ix in range(KW):
                    nx = x + (ix - KW // 2) * dilation
                    ok = ok_zy & (nx >= 0) & (nx < width)
                    r = r_zy + tl.load(rel + (KD + KH + ix) * channels + chan, mask=chan_ok, other=0.0)
                    there = base + s_part + (nz * s_z + ny * s_y + nx * s_x)[:, None] + chan_off
                    key = tl.load(there, mask=ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
                    logit = tl.where(ok, tl.sum(q * (key + r[None, :]), axis=1), float("-inf"))
                    m_new = tl.maximum(m, logit)
                    total = total * tl.exp2(m - m_new) + tl.exp2(logit - m_new)
                    m = m_new
        lse2 = m + tl.log2(tl.where(total > 0, total, 1.0))
    else:
        lse2 = tl.load(lse + per_position, mask=inside, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    tl.store(lse2_buf + per_position, lse2, mask=inside)
    tl.store(delta_buf + per_position, delta, mask=inside)
    grad_q = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    partial = grad_rel_part + (plane.to(tl.int64) * tl.num_programs(0) + block) * (KD * KH * KW * channels)
    for iz in range(KD):
        nz = z + (iz - KD // 2) * dilation
        r_z = tl.load(rel + iz * channels + chan, mask=chan_ok, other=0.0)
        for iy in range(KH):
            ny = y + (iy - KH // 2) * dilation
            r_zy = r_z + tl.load(rel + (KD + iy) * channels + chan, mask=chan_ok, other=0.0)
            ok_zy = inside & (nz >= 0) & (nz < depth) & (ny >= 0) & (ny < height)
            for ix in range(KW):
                nx = x + (ix - KW // 2) * dilation
                ok = ok_zy & (nx >= 0) & (nx < width)
                r = r_zy + tl.load(rel + (KD + KH + ix) * channels + chan, mask=chan_ok, other=0.0)
                there = base + (nz * s_z + ny * s_y + nx * s_x)[:, None] + chan_off
                mask = ok[:, None] & chan_ok[None, :]
                key = tl.load(there + s_part, mask=mask, other=0.0).to(tl.float32) + r[None, :]
                value = tl.load(there + 2 * s_part, mask=mask, other=0.0).to(tl.float32)
                attention = tl.exp2(tl.where(ok, tl.sum(q * key, axis=1) - lse2, float("-inf")))
                grad_logit = attention * (tl.sum(g * value, axis=1) - delta)
                grad_q += grad_logit[:, None] * key
                offset = (iz * KH + iy) * KW + ix
                grad_r = tl.sum(grad_logit[:, None] * q_raw, axis=0) * scale
                tl.store(partial + offset * channels + chan, grad_r, mask=chan_ok)
    grad_plane = (batch.to(tl.int64) * 3 * heads + head) * channels * image
    grad_dense = grad_plane + (chan * image)[None, :] + pos[:, None]
    tl.store(grad_qkv + grad_dense, (grad_q * scale).to(grad_qkv.dtype.element_ty), mask=tile_ok)


def _backward_key_kernel(
    qkv, rel, grad_out, grad_qkv, lse2_buf, delta_buf,
    heads, channels, depth, height, width, dilation, scale, qk_scale,
    s_b, s_part, s_head, s_chan, s_z, s_y, s_x,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per key block: ``dk`` and ``dv``, gathered from the query at ``key - offset`` for every offset."""
    block, plane = tl.program_id(0), tl.program_id(1)
    batch, head = plane // heads, plane % heads
    image = depth * height * width
    pos = block * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pos < image
    x, y, z = pos % width, (pos // width) % height, pos // (width * height)
    chan = tl.arange(0, BLOCK_D)
    chan_ok = chan < channels
    tile_ok = inside[:, None] & chan_ok[None, :]
    chan_off = (chan * s_chan)[None, :]
    base = qkv + batch.to(tl.int64) * s_b + head.to(tl.int64) * s_head
    here = base + (z * s_z + y * s_y + x * s_x)[:, None] + chan_off
    key = tl.load(here + s_part, mask=tile_ok, other=0.0).to(tl.float32)
    value = tl.load(here + 2 * s_part, mask=tile_ok, other=0.0).to(tl.float32)
    plane_dense = plane.to(tl.int64) * channels * image
    plane_positions = plane.to(tl.int64) * image
    grad_k = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for iz in range(KD):
        qz = z - (iz - KD // 2) * dilation
        r_z = tl.load(rel + iz * channels + chan, mask=chan_ok, other=0.0)
        for iy in range(KH):
            qy = y - (iy - KH // 2) * dilation
            r_zy = r_z + tl.load(rel + (KD + iy) * channels + chan, mask=chan_ok, other=0.0)
            ok_zy = inside & (qz >= 0) & (qz < depth) & (qy >= 0) & (qy < height)
            for ix in range(KW):
                qx = x - (ix - KW // 2) * dilation
                ok = ok_zy & (qx >= 0) & (qx < width)
                r = r_zy + tl.load(rel + (KD + KH + ix) * channels + chan, mask=chan_ok, other=0.0)
                mask = ok[:, None] & chan_ok[None, :]
                query = (qz * height + qy) * width + qx
                q_raw = tl.load(base + (qz * s_z + qy * s_y + qx * s_x)[:, None] + chan_off, mask=mask, other=0.0)
                q_raw = q_raw.to(tl.float32)
                g = tl.load(grad_out + plane_dense + (chan * image)[None, :] + query[:, None], mask=mask, other=0.0)
                g = g.to(tl.float32)
                lse2 = tl.load(lse2_buf + plane_positions + query, mask=ok, other=0.0)
                delta = tl.load(delta_buf + plane_positions + query, mask=ok, other=0.0)
                logit = tl.sum(q_raw * qk_scale * (key + r[None, :]), axis=1)
                attention = tl.exp2(tl.where(ok, logit - lse2, float("-inf")))
                grad_v += attention[:, None] * g
                grad_logit = attention * (tl.sum(g * value, axis=1) - delta)
                grad_k += grad_logit[:, None] * q_raw
    grad_plane = (batch.to(tl.int64) * 3 * heads + head) * channels * image
    grad_dense = grad_plane + (chan * image)[None, :] + pos[:, None]
    part = heads * channels * image
    tl.store(grad_qkv + part + grad_dense, (grad_k * scale).to(grad_qkv.dtype.element_ty), mask=tile_ok)
    tl.store(grad_qkv + 2 * part + grad_dense, grad_v.to(grad_qkv.dtype.element_ty), mask=tile_ok)


class _Kernels(NamedTuple):
    """The kernels, compiled by Triton (or run by its interpreter)."""

    forward: object
    backward_query: object
    backward_key: object


@functools.cache
def _compiled() -> _Kernels:
    """Import Triton and wrap the kernels with ``triton.jit`` (once per process): compiled for the GPU at their first
    launch, or run by Triton's interpreter if ``TRITON_INTERPRET=1`` was set before Triton was first imported."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return _Kernels(*(triton.jit(kernel) for kernel in (_forward_kernel, _backward_query_kernel, _backward_key_kernel)))


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (imported by this check, which runs when a CUDA tensor first meets the
    operators, never when monai_qsa is imported)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _warn_missing_triton() -> None:
    warnings.warn(
        "Triton is not installed: SA layers on CUDA run their attention in PyTorch operations (slower, more memory). "
        "Install the triton version your torch build names to get the fused CUDA kernels.",
        RuntimeWarning,
        stacklevel=5,
    )


def triton_supports(qkv: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these tensors: CUDA, fp32/fp16/bf16, Triton installed, and not disabled by
    ``MONAI_QSA_FUSED_ATTENTION=0``. Warns once when a CUDA tensor meets a missing Triton."""
    if qkv.device.type != "cuda" or qkv.dtype not in _DTYPES or table.dtype not in _DTYPES:
        return False
    if os.environ.get("MONAI_QSA_FUSED_ATTENTION", "1") == "0":
        return False
    if not triton_available():
        _warn_missing_triton()
        return False
    return True


class _Launch(NamedTuple):
    """What every kernel launch shares: sizes, strides and block shapes."""

    grid: tuple[int, int]
    sizes: tuple[int, ...]  # heads, channels, depth, height, width, dilation
    strides: tuple[int, ...]  # of qkv: batch, q/k/v, head, channel, z, y, x (z is 0 in 2D)
    constants: dict[str, int]
    num_warps: int


def _launch_parameters(qkv: torch.Tensor, kernel_size: int, dilation: int) -> _Launch:
    """Grid, sizes, strides and block shapes for ``qkv`` ``(B, 3, heads, d, *S)``; 2D images are depth 1."""
    batch, _, heads, channels, *spatial = qkv.shape
    dims = len(spatial)
    depth, height, width = [1] * (3 - dims) + spatial
    block_d = max(2, 1 << (channels - 1).bit_length())
    block_p = max(16, min(128, 2048 // block_d))  # at most 16 fp32 registers per thread and tile, 4 warps
    grid = (-(-depth * height * width // block_p), batch * heads)
    strides = (*qkv.stride()[:4], *([0] * (3 - dims)), *qkv.stride()[4:])
    constants = dict(
        KD=1 if dims == 2 else kernel_size, KH=kernel_size, KW=kernel_size, BLOCK_P=block_p, BLOCK_D=block_d
    )
    return _Launch(grid, (heads, channels, depth, height, width, dilation), strides, constants, 4)


def _kernel_table(table: torch.Tensor) -> torch.Tensor:
    """The table as the kernels read it: ``(kd + kh + kw, d_head)`` fp32, 2D given one zero depth row."""
    rel = table.reshape(-1, table.shape[-1]).to(torch.float32)
    if table.shape[0] == 2:
        rel = torch.cat([rel.new_zeros(1, rel.shape[1]), rel])
    return rel.contiguous()


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The CUDA device of ``tensor`` made current (Triton launches on the current device); nothing on CPU."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def triton_forward(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float, save_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton forward pass: the output ``(B, heads, d_head, *S)`` in the dtype of ``qkv`` and, if ``save_lse``,
    the log-sum-exp of each position's logits ``(B, heads, *S)`` (same dtype). ``qkv`` may have any strides.

    Args:
        qkv: queries, keys and values ``(B, 3, heads, d_head, *S)``, fp32, fp16 or bf16.
        table: the relative-position table ``(spatial_dims, kernel_size, d_head)``.
        kernel_size: neighbourhood side (odd).
        dilation: spacing between neighbours.
        scale: factor of the logits.
        save_lse: whether to return the log-sum-exp (training) or None (inference).

    Returns:
        the output and the log-sum-exp (or None).
    """
    launch = _launch_parameters(qkv, kernel_size, dilation)
    batch, _, heads, channels, *spatial = qkv.shape
    out = qkv.new_empty((batch, heads, channels, *spatial))
    lse = qkv.new_empty((batch, heads, *spatial)) if save_lse else None
    if out.numel() == 0:
        return out, lse
    with _on_device(qkv):
        _compiled().forward[launch.grid](
            qkv, _kernel_table(table), out, out if lse is None else lse, *launch.sizes, scale * _LOG2E,
            *launch.strides, **launch.constants, SAVE_LSE=save_lse, num_warps=launch.num_warps,
        )  # fmt: skip
    return out, lse


def triton_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backward pass: gradients of the projection ``(B, 3, heads, d_head, *S)`` (contiguous, dtype of
    ``qkv``) and of the table. For fp16/bf16 inputs the log-sum-exp is recomputed in fp32 rather than read from
    ``lse``, which holds it rounded to their precision.

    Args:
        grad_out: gradient of the output ``(B, heads, d_head, *S)``.
        qkv, table, kernel_size, dilation, scale: the forward pass' arguments.
        out, lse: the forward pass' output and log-sum-exp.

    Returns:
        the gradients of ``qkv`` and of ``table``.
    """
    launch = _launch_parameters(qkv, kernel_size, dilation)
    dims = table.shape[0]
    batch, _, heads, channels, *spatial = qkv.shape
    grad_qkv = qkv.new_empty((batch, 3, heads, channels, *spatial))
    if grad_qkv.numel() == 0:
        return grad_qkv, torch.zeros_like(table)
    # per (plane, block, offset): the block's sum of the table gradient, added up below in a fixed order
    grad_rel_part = qkv.new_empty((launch.grid[1], launch.grid[0], kernel_size**dims, channels), dtype=torch.float32)
    lse2 = qkv.new_empty((batch, heads, *spatial), dtype=torch.float32)
    delta = torch.empty_like(lse2)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    rel, kernels, constants = _kernel_table(table), _compiled(), launch.constants
    shared = (*launch.sizes, scale, scale * _LOG2E, *launch.strides)
    with _on_device(qkv):
        kernels.backward_query[launch.grid](
            qkv, rel, grad_out, out, lse, grad_qkv, lse2, delta, grad_rel_part, *shared, **constants,
            RECOMPUTE_LSE=qkv.dtype != torch.float32, num_warps=launch.num_warps,
        )  # fmt: skip
        kernels.backward_key[launch.grid](
            qkv, rel, grad_out, grad_qkv, lse2, delta, *shared, **constants, num_warps=launch.num_warps
        )
    per_offset = grad_rel_part.sum((0, 1)).reshape((kernel_size,) * dims + (channels,))
    axes = range(dims)
    grad_table = torch.stack([per_offset.sum(tuple(a for a in axes if a != axis)) for axis in axes])
    return grad_qkv, grad_table.to(table.dtype)
