"""The neighbourhood attention core of :class:`~monai_qsa.networks.blocks.StandAloneSelfAttention`.

Two implementations of one function:

- :func:`local_attention_reference`: PyTorch operations, differentiable; used for training and attention maps.
- the custom operator ``torch.ops.monai_qsa.local_attention`` (inference): a fused C kernel
  (``local_attention.c``) that computes logits, softmax and weighted sum per row of positions without writing the
  ``k^d`` logits of the whole image to memory. It is compiled once per machine with the system C compiler
  (``$CC``, else ``cc``/``gcc``) and cached under ``$MONAI_QSA_CACHE_DIR`` (default
  ``~/.cache/monai_qsa``). Without a compiler, or with ``MONAI_QSA_FUSED_ATTENTION=0``, the operator runs the
  reference implementation (one warning). Being a registered operator, it is captured by ``torch.export`` (int8
  artifacts keep it as one node) and ``torch.compile``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "local_attention_reference",
    "fused_kernel_available",
    "neighbourhood_padding",
    "relative_logits",
    "relative_position_table",
]

_SOURCE = Path(__file__).with_name("local_attention.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def neighbourhood_padding(kernel_size: int, dilation: int) -> int:
    """Zero padding per side that gives every position its full (dilated) neighbourhood."""
    return dilation * (kernel_size - 1) // 2


def relative_position_table(rel_pos: list[torch.Tensor], axis_channels: list[int]) -> torch.Tensor:
    """Per-axis relative-position embeddings ``(spatial_dims, kernel_size, d_head)``, each zero outside the head
    channels given to its axis, so that ``q . r_o`` is the sum over axes of ``q . table[axis, offset_on_axis]``.

    Args:
        rel_pos: one ``(kernel_size, axis_channels[axis])`` embedding per axis.
        axis_channels: channels of each head given to each axis, summing to ``d_head``.
    """
    head_channels, start, rows = sum(axis_channels), 0, []
    for embedding, channels in zip(rel_pos, axis_channels):
        rows.append(F.pad(embedding, (start, head_channels - start - channels)))
        start += channels
    return torch.stack(rows)


def relative_logits(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``q . r_o`` for every offset, ``(B, heads, k^d, *S)`` in ``itertools.product`` order of the offsets."""
    dims, kernel_size = table.shape[0], table.shape[1]
    total = None
    for axis in range(dims):
        logits = torch.einsum("bhc...,kc->bh...k", q, table[axis])  # (B, heads, *S, k)
        view = [1] * dims
        view[axis] = kernel_size
        logits = logits.reshape(logits.shape[:-1] + tuple(view))  # this axis' offset at position `axis`
        total = logits if total is None else total + logits
    return total.flatten(-dims).movedim(-1, 2)


def _sliding_windows(padded: torch.Tensor, dims: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """A strided view ``(..., *[k] * d, *S)`` of every neighbourhood of a padded tensor; copies nothing."""
    span = dilation * (kernel_size - 1) + 1
    for axis in range(padded.ndim - dims, padded.ndim):
        padded = padded.unfold(axis, span, 1)  # appends a window axis of size `span`
    if dilation > 1:
        padded = padded[(Ellipsis,) + (slice(None, None, dilation),) * dims]
    # (..., *S, *k) -> (..., *k, *S): positions innermost, so fused loops vectorise along the image rows
    return padded.movedim(tuple(range(-2 * dims, -dims)), tuple(range(-dims, 0)))


def _split_and_pad(qkv: torch.Tensor, kernel_size: int, dilation: int, scale: float) -> tuple[torch.Tensor, ...]:
    """Scaled queries ``(B, heads, d_head, *S)`` and keys/values zero-padded by ``dilation * (k - 1) // 2``."""
    q, k, v = qkv.unbind(1)
    pad = [neighbourhood_padding(kernel_size, dilation)] * (2 * (qkv.ndim - 4))
    return q * scale, F.pad(k, pad), F.pad(v, pad)


def local_attention_reference(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhood attention in PyTorch operations.

    Eager calls loop over the offsets (memory-light); inside ``torch.compile``/``torch.export`` it is written over
    sliding-window views, which Inductor fuses into reductions that never materialise them.

    Args:
        qkv: queries, keys and values of every head, ``(B, 3, heads, d_head, *S)``.
        table: :func:`relative_position_table` output ``(spatial_dims, kernel_size, d_head)``.
        kernel_size: neighbourhood side length (odd).
        dilation: spacing between neighbours.
        scale: factor of the logits, ``1 / sqrt(d_head)``.

    Returns:
        the output ``(B, heads, d_head, *S)`` and the attention ``(B, heads, k^d, *S)``.
    """
    q, k_pad, v_pad = _split_and_pad(qkv, kernel_size, dilation, scale)
    dims, spatial = table.shape[0], tuple(q.shape[3:])
    pad = [neighbourhood_padding(kernel_size, dilation)] * (2 * dims)
    inside = F.pad(torch.ones((1, 1) + spatial, dtype=torch.bool, device=q.device), pad)  # False on the padding
    relative = relative_logits(q, table)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        windows = functools.partial(_sliding_windows, dims=dims, kernel_size=kernel_size, dilation=dilation)
        # (B, heads, d_head, 1.., *S) * (B, heads, d_head, *k, *S), summed over d_head -> (B, heads, k^d, *S)
        logits = (q.unflatten(2, (-1,) + (1,) * dims) * windows(k_pad)).sum(2).flatten(2, 1 + dims)
        valid = windows(inside).flatten(2, 1 + dims)  # (1, 1, k^d, *S)
        attn = (logits + relative).masked_fill(~valid, float("-inf")).softmax(dim=2)
        # (B, heads, 1, *k, *S) * (B, heads, d_head, *k, *S), summed over the offsets -> (B, heads, d_head, *S)
        out = (attn.unflatten(2, (kernel_size,) * dims).unsqueeze(2) * windows(v_pad)).sum(tuple(range(3, 3 + dims)))
        return out, attn
    slices = [
        (Ellipsis,) + tuple(slice(i * dilation, i * dilation + size) for i, size in zip(offset, spatial))
        for offset in itertools.product(range(kernel_size), repeat=dims)
    ]
    logits = torch.stack([(q * k_pad[s]).sum(2) for s in slices], dim=2)
    valid = torch.stack([inside[s] for s in slices], dim=2)  # (1, 1, k^d, *S)
    attn = (logits + relative).masked_fill(~valid, float("-inf")).softmax(dim=2)
    out = None
    for index, s in enumerate(slices):
        term = attn[:, :, index : index + 1] * v_pad[s]  # (B, heads, 1, *S) * (B, heads, d_head, *S)
        out = term if out is None else out + term
    return out, attn


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return platform.machine() + "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build(library: Path) -> bool:
    """Compile the kernel into ``library``; False (with one warning) without a working C compiler."""
    from monai_qsa.utils.compile import find_compiler  # not at module level: monai_qsa.utils imports this module

    compiler = find_compiler("CC", ("cc", "gcc", "clang"))
    if compiler is None:
        warnings.warn(
            "No C compiler found ($CC, cc, gcc, clang): SA layers run their attention in PyTorch operations, "
            "several times slower at inference. Install gcc to build monai_qsa's fused kernel.",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # build aside, then rename: concurrent builds are safe
            built = Path(tmp) / library.name
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
            os.replace(built, library)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"Could not build monai_qsa's fused attention kernel with {compiler} ({detail.strip()[:300]}); "
            "SA layers run their attention in PyTorch operations (slower).",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


@functools.cache
def _kernels() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """The compiled C functions (attention, split-and-pad), built on first use and cached on disk; None (with one
    warning) if unavailable."""
    if os.environ.get("MONAI_QSA_FUSED_ATTENTION", "1") == "0":
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MONAI_QSA_CACHE_DIR", Path.home() / ".cache" / "monai_qsa")) / "kernels"
    library = cache / f"local_attention_{key}.so"
    if not library.exists() and not _build(library):
        return None
    try:
        library = ctypes.CDLL(str(library))
    except OSError as error:  # e.g. a damaged cache file
        warnings.warn(
            f"Could not load {library} ({error}); SA layers run their attention in PyTorch operations. Delete the "
            "file to rebuild the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    attend, split_and_pad = library.monai_qsa_local_attention, library.monai_qsa_split_and_pad
    attend.restype, split_and_pad.restype = ctypes.c_int, None
    attend.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_int] * 5
    split_and_pad.argtypes = (
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)] + [ctypes.c_int64] * 8 + [ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    )
    return attend, split_and_pad


def fused_kernel_available() -> bool:
    """Whether ``torch.ops.monai_qsa.local_attention`` runs the compiled C kernel (else the reference)."""
    return _kernels() is not None


# flexible_layout: Inductor hands over the projection in the layout it has (channels-last after int8 convolutions)
# instead of first copying it to a contiguous one; the operator's own split-and-pad pass does the layout change
@torch.library.custom_op("monai_qsa::local_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def local_attention(qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float) -> torch.Tensor:
    """Inference-only neighbourhood attention (no autograd): :func:`local_attention_reference`'s output, computed
    by the fused C kernel for fp32 CPU tensors when it is available.

    The projection is taken as it is, in any memory layout (int8 convolutions leave it channels-last): splitting,
    scaling, padding and the layout change are one C pass here, not graph operations.
    """
    kernels = _kernels()
    if kernels is None or qkv.device.type != "cpu" or qkv.dtype != torch.float32:
        return local_attention_reference(qkv, table, kernel_size, dilation, scale)[0]
    attend, split_and_pad = kernels
    dims = table.shape[0]
    batch, _, heads, head_channels, *spatial = qkv.shape
    if qkv.stride(2) != head_channels * qkv.stride(3):  # heads and their channels not one evenly strided axis
        qkv = qkv.contiguous()
    depth, height, width = ([1] + spatial) if dims == 2 else spatial
    half = neighbourhood_padding(kernel_size, dilation)
    pad_z = 0 if dims == 2 else half
    q = qkv.new_empty((batch, heads, head_channels, *spatial))
    k_pad = qkv.new_zeros((batch, heads, head_channels, depth + 2 * pad_z, height + 2 * half, width + 2 * half))
    v_pad = torch.zeros_like(k_pad)
    spatial_strides = ([0] + list(qkv.stride()[4:])) if dims == 2 else list(qkv.stride()[4:])
    strides = (ctypes.c_int64 * 6)(qkv.stride(0), qkv.stride(1), qkv.stride(3), *spatial_strides)
    threads = torch.get_num_threads()
    split_and_pad(
        qkv.data_ptr(), strides, batch, heads * head_channels, depth, height, width, pad_z, half, half, scale,
        q.data_ptr(), k_pad.data_ptr(), v_pad.data_ptr(), threads,
    )  # fmt: skip
    rel = table.reshape(-1, head_channels).to(torch.float32)
    if dims == 2:  # the kernel sees 2D images as depth 1, with one (zero) depth offset
        rel = torch.cat([rel.new_zeros(1, head_channels), rel])
    rel = rel.contiguous()
    out = torch.empty_like(q)
    status = attend(
        q.data_ptr(), k_pad.data_ptr(), v_pad.data_ptr(), rel.data_ptr(), out.data_ptr(),
        batch * heads, head_channels, depth, height, width,
        1 if dims == 2 else kernel_size, kernel_size, kernel_size, dilation, threads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("monai_qsa local attention kernel: could not allocate its scratch memory.")
    return out


@local_attention.register_fake
def _(qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[:1] + qkv.shape[2:])
