"""The neighbourhood attention core of :class:`~monai_qsa.networks.blocks.StandAloneSelfAttention`.

Implementations of one function:

- :func:`local_attention_reference`: PyTorch operations, differentiable; used for attention maps.
- ``torch.ops.monai_qsa.local_attention_forward`` / ``local_attention_backward`` (training; autograd registered,
  :func:`fused_local_attention`): a fused C kernel (``local_attention.c``) whose forward pass also saves each
  position's log-sum-exp and whose backward pass recomputes the attention from it; Triton kernels on CUDA
  (``local_attention_triton``); PyTorch operations elsewhere (:func:`_fused_kernels` dispatches).
- ``torch.ops.monai_qsa.local_attention`` (inference; the operator exported into int8 artifacts): the fused C
  forward pass, which computes logits, softmax and weighted sum per row of positions without writing the ``k^d``
  logits of the whole image to memory.

The C kernel is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
by :func:`compiled_library` and cached under ``$MONAI_QSA_CACHE_DIR/kernels`` (default
``~/.cache/monai_qsa/kernels``). Without a compiler, or with ``MONAI_QSA_FUSED_ATTENTION=0``, the operators run
PyTorch operations (one warning). Being registered operators, they are captured by ``torch.export`` and
``torch.compile``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import math
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from monai_qsa.networks.blocks.local_attention_triton import triton_backward, triton_forward, triton_supports
from monai_qsa.utils.cache import cache_dir
from monai_qsa.utils.compile import find_compiler
from monai_qsa.utils.cpu import cpu_signature

__all__ = [
    "check_attention_arguments",
    "compiled_library",
    "fused_local_attention",
    "kernel_cache_dir",
    "local_attention_reference",
    "fused_kernel_available",
    "neighbourhood_padding",
    "relative_logits",
    "relative_position_table",
]

_SOURCE = Path(__file__).with_name("local_attention.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
#: environment variable of extra compiler flags for the C kernels, part of their cache key: e.g. ``-mno-avx512f``
#: builds them as for an AVX2-only CPU, to test or time those builds on an AVX-512 machine. Read when a kernel is
#: first used in a process.
CFLAGS_VARIABLE = "MONAI_QSA_KERNEL_CFLAGS"
_logger = logging.getLogger(__name__)
#: multiply-accumulates per thread, at least. Measured on 2 cores (fp32 forward and backward, int8 forward): a second
#: thread pays from about this much work on (1.3-1.8x faster at 4x4 to 16x16 positions of 16-64 channels, at most
#: 2 us slower at 2x2x2); 1 << 20 left the coarse levels of every network on one thread. Tuned on 2 cores only
_GRAIN = 1 << 14
#: largest neighbourhood side and dilation the operators accept: the C kernels take them as C ints (ctypes truncates
#: larger values silently) and size their scratch buffers from ``kernel_size ** 3``
MAX_KERNEL_SIZE = 255
MAX_DILATION = 1 << 16


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


def _neighbour_slices(spatial: tuple[int, ...], kernel_size: int, dilation: int) -> list[tuple]:
    """Per offset (``itertools.product`` order), the slice of a padded tensor holding every position's neighbour."""
    return [
        (Ellipsis,) + tuple(slice(i * dilation, i * dilation + size) for i, size in zip(offset, spatial))
        for offset in itertools.product(range(kernel_size), repeat=len(spatial))
    ]


def _reference_attention(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`local_attention_reference`'s output and attention, and the logits ``(B, heads, k^d, *S)`` (``-inf``
    for neighbours outside the image)."""
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
        logits = (logits + relative).masked_fill(~valid, float("-inf"))
        attn = logits.softmax(dim=2)
        # (B, heads, 1, *k, *S) * (B, heads, d_head, *k, *S), summed over the offsets -> (B, heads, d_head, *S)
        out = (attn.unflatten(2, (kernel_size,) * dims).unsqueeze(2) * windows(v_pad)).sum(tuple(range(3, 3 + dims)))
        return out, attn, logits
    slices = _neighbour_slices(spatial, kernel_size, dilation)
    logits = torch.stack([(q * k_pad[s]).sum(2) for s in slices], dim=2)
    valid = torch.stack([inside[s] for s in slices], dim=2)  # (1, 1, k^d, *S)
    logits = (logits + relative).masked_fill(~valid, float("-inf"))
    attn = logits.softmax(dim=2)
    out = None
    for index, s in enumerate(slices):
        term = attn[:, :, index : index + 1] * v_pad[s]  # (B, heads, 1, *S) * (B, heads, d_head, *S)
        out = term if out is None else out + term
    return out, attn, logits


def _reference_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward pass of the neighbourhood attention in PyTorch operations, one offset at a time (the formulas of
    the C kernel, ``local_attention.c``): gradients of the projection and of the table."""
    q, k_pad, v_pad = _split_and_pad(qkv, kernel_size, dilation, scale)
    dims, spatial = table.shape[0], tuple(q.shape[3:])
    pad = [neighbourhood_padding(kernel_size, dilation)] * (2 * dims)
    inside = F.pad(torch.ones((1, 1) + spatial, dtype=torch.bool, device=q.device), pad)
    relative = relative_logits(q, table)  # (B, heads, k^d, *S)
    delta = (grad_out * out).sum(2)  # (B, heads, *S)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k_pad), torch.zeros_like(v_pad)
    grad_logits = []
    for index, s in enumerate(_neighbour_slices(spatial, kernel_size, dilation)):
        logit = (q * k_pad[s]).sum(2) + relative[:, :, index]
        attention = (logit - lse).masked_fill(~inside[s][:, 0], float("-inf")).exp()  # (B, heads, *S)
        grad_logit = attention * ((grad_out * v_pad[s]).sum(2) - delta)
        grad_q += grad_logit.unsqueeze(2) * k_pad[s]
        grad_k[s] += grad_logit.unsqueeze(2) * q
        grad_v[s] += attention.unsqueeze(2) * grad_out
        grad_logits.append(grad_logit)
    per_offset = torch.stack(grad_logits, dim=2).unflatten(2, (kernel_size,) * dims)  # (B, heads, *k, *S)
    grad_table = torch.empty_like(table)
    for axis in range(dims):  # the relative logits: q . table[axis, offset on the axis], summed over the axes
        others = tuple(2 + a for a in range(dims) if a != axis)
        per_axis_offset = per_offset.sum(others) if others else per_offset  # (B, heads, k, *S)
        grad_q += torch.einsum("bhk...,kc->bhc...", per_axis_offset, table[axis])
        grad_table[axis] = torch.einsum("bhk...,bhc...->kc", per_axis_offset, q)
    interior = (Ellipsis,) + tuple(slice(p, p + size) for p, size in zip(pad[::2], spatial))
    return torch.stack([grad_q * scale, grad_k[interior], grad_v[interior]], dim=1), grad_table


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
    out, attn, _ = _reference_attention(qkv, table, kernel_size, dilation, scale)
    return out, attn


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def kernel_cache_dir() -> Path:
    """Where compiled kernels are cached: ``$MONAI_QSA_CACHE_DIR/kernels`` (default ``~/.cache/monai_qsa/kernels``)."""
    return cache_dir() / "kernels"


def _unsafe_reason(path: Path) -> str | None:
    """Why ``path`` (a cache directory or file) must not be trusted: owned by another user or writable by group or
    others; None if it is private to this user."""
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"{path} is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _private_cache(cache: Path) -> str | None:
    """Create the cache directory (and its parent) with mode 0700 if missing; why it must not be used, or None."""
    try:
        for directory in (cache.parent, cache):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if reason := _unsafe_reason(directory):
                return f"the kernel cache {reason}"
    except OSError as error:
        return f"the kernel cache {cache} is not usable ({error})"
    return None


def _artifact_key(source: Path, flags: tuple[str, ...]) -> str:
    """The part of a cache entry's name that the compiler does not enter: source, flags and the CPU (ISA)."""
    return hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + cpu_signature().encode()).hexdigest()[:16]


def _compiler_key(compiler: str) -> str:
    return hashlib.sha256(os.path.realpath(compiler).encode()).hexdigest()[:8]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(entry: Path, source: Path) -> Path | str:
    """The library of cache entry ``entry`` if it is private and its SHA-256 is the one recorded when it was built,
    else why it is refused."""
    library, digest = entry / f"{source.stem}.so", entry / f"{source.stem}.so.sha256"
    for path in (entry, library, digest):
        if not path.exists():
            return f"{path} is missing"
        if reason := _unsafe_reason(path):
            return reason
    if digest.read_text().strip() != _sha256(library):
        return f"{library} does not match the SHA-256 recorded when it was built"
    return library


def _build(compiler: str, source: Path, flags: tuple[str, ...], directory: Path) -> Path:
    """Compile ``source`` into ``directory`` and record the library's SHA-256 beside it; raises
    ``subprocess.CalledProcessError`` or ``OSError``."""
    library = directory / f"{source.stem}.so"
    _logger.info(f"Building monai_qsa's {source.stem} kernel (once per machine)...")
    command = [compiler, *flags, str(source), "-o", str(library), "-lm"]  # libraries after the source that uses them
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    _logger.info(f"Built {library.name} in {time.perf_counter() - start:.1f} s")
    library.chmod(0o700)
    digest = directory / f"{source.stem}.so.sha256"
    digest.write_text(_sha256(library))
    digest.chmod(0o600)
    return library


def _build_into_cache(compiler: str, source: Path, flags: tuple[str, ...], entry: Path) -> Path:
    """Build in a private directory beside ``entry`` and rename it to ``entry`` (returned): library and hash appear
    together, and of concurrent builds the first rename wins."""
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".build_"))  # mode 0700
    try:
        _build(compiler, source, flags, staging)
        try:
            staging.rename(entry)
        except OSError:  # another process has just built the same entry
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _load(library: Path) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        _warn(f"Could not load {library} ({error}); SA layers run their attention in PyTorch operations.")
        return None


def _build_privately(compiler: str, source: Path, flags: tuple[str, ...], refusal: str) -> ctypes.CDLL | None:
    """Build into a new private temporary directory, load, delete the directory; one warning saying why."""
    with tempfile.TemporaryDirectory(prefix="monai_qsa_kernel_") as private:
        library = _build(compiler, source, flags, Path(private))
        _warn(
            f"Not loading cached kernels: {refusal}. Built {source.name} in a private temporary directory instead "
            "(again in every process until the cache is fixed or deleted)."
        )
        return _load(library)


def compiled_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The C source ``source`` compiled into a shared library and loaded, from the per-machine cache when it is there.

    The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) and the flags of the
    fused kernels plus ``extra_flags`` and those of ``$MONAI_QSA_KERNEL_CFLAGS`` (:data:`CFLAGS_VARIABLE`), and
    cached under :func:`kernel_cache_dir`, keyed by the source bytes, the flags, the compiler and the CPU's model and
    feature flags (the ISA ``-march=native`` builds for). Security: the cache directory is created with mode 0700;
    a cache directory or file owned by another user or writable by group or others is never loaded from (the library
    is then built in a private temporary directory), and a cached library is loaded only if its SHA-256 equals the
    one recorded beside it when it was built. Without a compiler, a cached build of another compiler is used.

    Args:
        source: the C file.
        extra_flags: compiler flags appended to the defaults, e.g. ``("-mno-avx512vnni",)`` to test another ISA path.

    Returns:
        the loaded library; None, with one ``RuntimeWarning`` saying why, when it can be neither loaded nor built,
        and None without a warning when ``MONAI_QSA_FUSED_ATTENTION=0``. Callers cache the result per process.
    """
    if os.environ.get("MONAI_QSA_FUSED_ATTENTION", "1") == "0":
        return None
    flags = (*_FLAGS, *extra_flags, *shlex.split(os.environ.get(CFLAGS_VARIABLE, "")))
    compiler = find_compiler("CC", ("cc", "gcc", "clang"))
    cache, key = kernel_cache_dir(), _artifact_key(source, flags)
    refusal = _private_cache(cache)
    try:
        if refusal is None:
            pattern = f"{source.stem}_{key}_{_compiler_key(compiler) if compiler else '*'}"
            for entry in sorted(cache.glob(pattern)):
                library = _verify(entry, source)
                if isinstance(library, Path):
                    return _load(library)
                refusal = library
            if refusal is None and compiler is not None:
                library = _verify(_build_into_cache(compiler, source, flags, cache / pattern), source)
                if isinstance(library, Path):
                    return _load(library)
                refusal = library
        if compiler is None:
            _warn(
                "No C compiler found ($CC, cc, gcc, clang)"
                + (f" and {refusal}" if refusal else "")
                + ": SA layers run their attention in PyTorch operations, several times slower. Install gcc to "
                "build monai_qsa's fused kernels."
            )
            return None
        return _build_privately(compiler, source, flags, refusal)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _warn(
            f"Could not build {source.name} with {compiler} ({detail.strip()[:300]}); SA layers run their attention "
            "in PyTorch operations (slower)."
        )
        return None


class _Kernels(NamedTuple):
    """The C functions of ``local_attention.c``."""

    attend: ctypes._CFuncPtr
    split_and_pad: ctypes._CFuncPtr
    backward: ctypes._CFuncPtr


@functools.cache
def _kernels() -> _Kernels | None:
    """The compiled C functions, built on first use and cached on disk; None (with one warning) if unavailable."""
    library = compiled_library(_SOURCE)
    if library is None:
        return None
    kernels = _Kernels(
        library.monai_qsa_local_attention, library.monai_qsa_split_and_pad, library.monai_qsa_local_attention_backward
    )
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    kernels.attend.restype, kernels.split_and_pad.restype, kernels.backward.restype = integer, None, integer
    kernels.attend.argtypes = [pointer] * 6 + [size] * 5 + [integer] * 5
    kernels.split_and_pad.argtypes = (
        [pointer, ctypes.POINTER(size)] + [size] * 8 + [ctypes.c_float] + [pointer] * 3 + [integer]
    )
    kernels.backward.argtypes = [pointer] * 9 + [size] * 6 + [integer] * 4 + [ctypes.c_float, integer]
    return kernels


def fused_kernel_available() -> bool:
    """Whether the attention operators run the compiled C kernel for fp32 CPU tensors (else the reference)."""
    return _kernels() is not None


def _kernel_table(table: torch.Tensor) -> torch.Tensor:
    """The table as the kernel reads it: ``(kd + kh + kw, d_head)`` fp32, 2D images given one zero depth offset."""
    rel = table.reshape(-1, table.shape[-1]).to(torch.float32)
    if table.shape[0] == 2:
        rel = torch.cat([rel.new_zeros(1, rel.shape[1]), rel])
    return rel.contiguous()


def _kernel_shape(dims: int, spatial: list[int], kernel_size: int) -> tuple[list[int], list[int]]:
    """The image ``(D, H, W)`` and neighbourhood ``(kd, kh, kw)`` sizes: 2D images are depth 1, one depth offset."""
    if dims == 2:
        return [1, *spatial], [1, kernel_size, kernel_size]
    return list(spatial), [kernel_size] * 3


def _threads_for(multiply_accumulates: int) -> int:
    """PyTorch's thread count, reduced to one thread per ``_GRAIN`` multiply-accumulates of a kernel call (small
    calls do not pay for starting and joining threads). The kernels' results do not depend on it."""
    return max(1, min(torch.get_num_threads(), multiply_accumulates // _GRAIN))


def _thread_count(qkv_shape: Sequence[int], kernel_size: int) -> int:
    """:func:`_threads_for` the attention of a projection of shape ``qkv_shape``."""
    return _threads_for(math.prod(qkv_shape) * kernel_size ** (len(qkv_shape) - 4))


def _check_status(status: int, kernel: str = "monai_qsa local attention kernel") -> None:
    """Raise for a C kernel's non-zero return status: 1 is ``MemoryError`` (scratch memory), others
    ``RuntimeError``."""
    if status == 1:
        raise MemoryError(f"{kernel}: could not allocate its scratch memory.")
    if status != 0:
        raise RuntimeError(f"{kernel}: failed with status {status}.")


def _split_for_kernel(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One C pass from the projection, in any memory layout, to the kernel's inputs: scaled queries
    ``(B, heads, d_head, *S)`` and keys, values zero-padded to ``(B, heads, d_head, D + 2pz, H + 2py, W + 2px)``."""
    dims = table.shape[0]
    batch, _, heads, head_channels, *spatial = qkv.shape
    if qkv.stride(2) != head_channels * qkv.stride(3):  # heads and their channels not one evenly strided axis
        qkv = qkv.contiguous()
    (depth, height, width), _ = _kernel_shape(dims, spatial, kernel_size)
    half = neighbourhood_padding(kernel_size, dilation)
    pad_z = 0 if dims == 2 else half
    q = qkv.new_empty((batch, heads, head_channels, *spatial))
    k_pad = qkv.new_zeros((batch, heads, head_channels, depth + 2 * pad_z, height + 2 * half, width + 2 * half))
    v_pad = torch.zeros_like(k_pad)
    spatial_strides = ([0] + list(qkv.stride()[4:])) if dims == 2 else list(qkv.stride()[4:])
    strides = (ctypes.c_int64 * 6)(qkv.stride(0), qkv.stride(1), qkv.stride(3), *spatial_strides)
    _kernels().split_and_pad(
        qkv.data_ptr(), strides, batch, heads * head_channels, depth, height, width, pad_z, half, half, scale,
        q.data_ptr(), k_pad.data_ptr(), v_pad.data_ptr(), _thread_count(qkv.shape, kernel_size),
    )  # fmt: skip
    return q, k_pad, v_pad


def _cpu_forward(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float, save_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The C forward pass: the output ``(B, heads, d_head, *S)`` and, if ``save_lse``, the log-sum-exp of each
    position's logits ``(B, heads, *S)``. The projection may have any memory layout."""
    batch, _, heads, head_channels, *spatial = qkv.shape
    q, k_pad, v_pad = _split_for_kernel(qkv, table, kernel_size, dilation, scale)
    image, neighbourhood = _kernel_shape(table.shape[0], spatial, kernel_size)
    rel = _kernel_table(table)
    out = torch.empty_like(q)
    lse = qkv.new_empty((batch, heads, *spatial)) if save_lse else None
    status = _kernels().attend(
        q.data_ptr(), k_pad.data_ptr(), v_pad.data_ptr(), rel.data_ptr(), out.data_ptr(),
        None if lse is None else lse.data_ptr(), batch * heads, head_channels, *image, *neighbourhood, dilation,
        _thread_count(qkv.shape, kernel_size),
    )  # fmt: skip
    _check_status(status)
    return out, lse


def _cpu_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C backward pass: gradients of the projection ``(B, 3, heads, d_head, *S)`` and of the table."""
    dims = table.shape[0]
    batch, _, heads, head_channels, *spatial = qkv.shape
    q, k_pad, v_pad = _split_for_kernel(qkv, table, kernel_size, dilation, scale)
    image, neighbourhood = _kernel_shape(dims, spatial, kernel_size)
    rel = _kernel_table(table)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    grad_qkv = qkv.new_empty((batch, 3, heads, head_channels, *spatial))
    grad_rel = torch.empty_like(rel)
    status = _kernels().backward(
        *(t.data_ptr() for t in (q, k_pad, v_pad, grad_out, out, lse, rel, grad_qkv, grad_rel)), batch, heads,
        head_channels, *image, *neighbourhood, dilation, scale, _thread_count(qkv.shape, kernel_size),
    )  # fmt: skip
    _check_status(status)
    grad_table = grad_rel[rel.shape[0] - dims * kernel_size :].reshape(table.shape).to(table.dtype)
    return grad_qkv, grad_table


def check_attention_arguments(
    operator: str,
    qkv: torch.Tensor,
    table: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
    *,
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    int8_scales: dict[str, float] | None = None,
) -> None:
    """Check the arguments of a ``monai_qsa`` attention operator against each other; raise ``ValueError`` saying what
    is wrong. Every operator's implementation calls it before anything else: the C kernels trust these shapes (they
    index their buffers with them), and a model file chooses the arguments of the calls in its graph.

    Checks (shapes, dtypes and devices only, no data is read):

    - ``qkv``: a strided floating-point tensor ``(B, 3, heads, d_head, *S)`` with 2 or 3 spatial dimensions (6-D or
      7-D);
    - ``table``: ``(spatial_dims, kernel_size, d_head)``, of the dtype and device of ``qkv``;
    - ``kernel_size``: odd, in ``[1, MAX_KERNEL_SIZE]``; ``dilation`` in ``[1, MAX_DILATION]``; ``scale`` finite;
    - ``saved`` (backward): ``grad_out`` and ``out`` ``(B, heads, d_head, *S)``, ``lse`` ``(B, heads, *S)``, of the
      dtype and device of ``qkv``;
    - ``int8_scales`` (int8 operator): each positive and finite.

    Args:
        operator: the operator's name, for the messages (e.g. ``"local_attention"``).
        qkv, table, kernel_size, dilation, scale: the operator's arguments.
        saved: ``(grad_out, out, lse)`` of the backward operator.
        int8_scales: the int8 scales by argument name (``q_scale``, ``k_scale``, ``v_scale``).
    """
    where = f"monai_qsa.{operator}"
    tensors = {"qkv": qkv, "table": table}
    if saved is not None:
        tensors.update(zip(("grad_out", "out", "lse"), saved))
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"{where}: {name} must be a dense (strided) tensor, got {type(tensor).__name__}.")
        if tensor.dtype != qkv.dtype or tensor.device != qkv.device:
            raise ValueError(
                f"{where}: {name} is {tensor.dtype} on {tensor.device}, but qkv is {qkv.dtype} on {qkv.device}; "
                "all tensors must share one dtype and device."
            )
    if qkv.ndim not in (6, 7) or qkv.shape[1] != 3 or not qkv.is_floating_point():
        raise ValueError(
            f"{where}: qkv must be a floating-point tensor (B, 3, heads, d_head, *spatial) with 2 or 3 spatial "
            f"dimensions, got {qkv.dtype} of shape {tuple(qkv.shape)}."
        )
    for name, value in (("kernel_size", kernel_size), ("dilation", dilation)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if not (1 <= kernel_size <= MAX_KERNEL_SIZE and kernel_size % 2 == 1):
        raise ValueError(f"{where}: kernel_size must be odd, between 1 and {MAX_KERNEL_SIZE}, got {kernel_size}.")
    if not 1 <= dilation <= MAX_DILATION:
        raise ValueError(f"{where}: dilation must be between 1 and {MAX_DILATION}, got {dilation}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}: scale must be a finite number, got {scale!r}.")
    dims, head_channels = qkv.ndim - 4, qkv.shape[3]
    expected_table = (dims, kernel_size, head_channels)
    if tuple(table.shape) != expected_table:
        raise ValueError(
            f"{where}: table must have shape (spatial_dims, kernel_size, d_head) = {expected_table} for qkv of shape "
            f"{tuple(qkv.shape)} and kernel_size {kernel_size}, got {tuple(table.shape)}."
        )
    if saved is not None:
        output_shape = (qkv.shape[0], *qkv.shape[2:])
        lse_shape = (qkv.shape[0], qkv.shape[2], *qkv.shape[4:])
        for name, tensor, shape in zip(("grad_out", "out", "lse"), saved, (output_shape, output_shape, lse_shape)):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{where}: {name} must have shape {shape} for qkv of shape {tuple(qkv.shape)}, "
                    f"got {tuple(tensor.shape)}."
                )
    for name, value in (int8_scales or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{where}: {name} must be a positive finite int8 scale, got {value!r}.")


def _fused_kernels(qkv: torch.Tensor, table: torch.Tensor, save_lse: bool = True) -> tuple[Callable, Callable] | None:
    """The one dispatch point of the operators: the fused ``(forward, backward)`` for these tensors, or None for the
    PyTorch reference. fp32 CPU tensors: the C kernels; CUDA tensors (fp32, fp16, bf16) with Triton installed: the
    Triton kernels (``local_attention_triton``).

    ``forward(qkv, table, kernel_size, dilation, scale) -> (out, lse)`` (``lse`` None unless ``save_lse``) and
    ``backward(grad_out, qkv, table, out, lse, kernel_size, dilation, scale) -> (grad_qkv, grad_table)``.
    """
    fp32_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (qkv, table))
    if fp32_cpu and _kernels() is not None:
        return functools.partial(_cpu_forward, save_lse=save_lse), _cpu_backward
    if triton_supports(qkv, table):
        return functools.partial(triton_forward, save_lse=save_lse), triton_backward
    return None


@torch.library.custom_op("monai_qsa::local_attention_forward", mutates_args=())
def local_attention_forward(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable neighbourhood attention (the training operator): :func:`local_attention_reference`'s output
    ``(B, heads, d_head, *S)`` and the log-sum-exp of each position's logits ``(B, heads, *S)``, which the backward
    operator uses to recompute the attention. Fused kernel where :func:`_fused_kernels` has one, else the reference.
    Raises ``ValueError`` for mismatched arguments (:func:`check_attention_arguments`).
    """
    check_attention_arguments("local_attention_forward", qkv, table, kernel_size, dilation, scale)
    kernels = _fused_kernels(qkv, table)
    if kernels is not None:
        return kernels[0](qkv, table, kernel_size, dilation, scale)
    out, _, logits = _reference_attention(qkv, table, kernel_size, dilation, scale)
    return out, logits.logsumexp(dim=2)


@local_attention_forward.register_fake
def _(qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float):
    return qkv.new_empty(qkv.shape[:1] + qkv.shape[2:]), qkv.new_empty(qkv.shape[:1] + qkv.shape[2:3] + qkv.shape[4:])


@torch.library.custom_op("monai_qsa::local_attention_backward", mutates_args=())
def local_attention_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilation: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the projection and of the table from the output's gradient (the backward of
    :func:`local_attention_forward`). Fused kernel where :func:`_fused_kernels` has one; else the reference's
    autograd graph, recomputed. Raises ``ValueError`` for mismatched arguments (:func:`check_attention_arguments`)."""
    check_attention_arguments(
        "local_attention_backward", qkv, table, kernel_size, dilation, scale, saved=(grad_out, out, lse)
    )
    kernels = _fused_kernels(qkv, table)
    backward = _reference_backward if kernels is None else kernels[1]
    return backward(grad_out, qkv, table, out, lse, kernel_size, dilation, scale)


@local_attention_backward.register_fake
def _(grad_out, qkv, table, out, lse, kernel_size, dilation, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(table)


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    qkv, table, kernel_size, dilation, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table, out, lse)
    ctx.attention_args = (kernel_size, dilation, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple:
    qkv, table, out, lse = ctx.saved_tensors
    grad_qkv, grad_table = local_attention_backward(grad_out.contiguous(), qkv, table, out, lse, *ctx.attention_args)
    return grad_qkv, grad_table, None, None, None


local_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_local_attention(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> torch.Tensor:
    """:func:`local_attention_reference`'s output through the differentiable fused operator (training and
    inference; no attention maps). Same arguments."""
    return local_attention_forward(qkv, table, kernel_size, dilation, scale)[0]


# flexible_layout: Inductor hands over the projection in the layout it has (channels-last after int8 convolutions)
# instead of first copying it to a contiguous one; the operator's own split-and-pad pass does the layout change
@torch.library.custom_op("monai_qsa::local_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def local_attention(
    qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float
) -> torch.Tensor:
    """Inference-only neighbourhood attention (no autograd; the operator exported into int8 artifacts):
    :func:`local_attention_reference`'s output, computed by the fused C kernel for fp32 CPU tensors when it is
    available, by the Triton kernel for CUDA tensors when Triton is installed.

    The projection is taken as it is, in any memory layout (int8 convolutions leave it channels-last): splitting,
    scaling, padding and the layout change are one C pass here, not graph operations. Raises ``ValueError`` for
    mismatched arguments (:func:`check_attention_arguments`): a model file chooses them.
    """
    check_attention_arguments("local_attention", qkv, table, kernel_size, dilation, scale)
    kernels = _fused_kernels(qkv, table, save_lse=False)
    if kernels is None:
        return local_attention_reference(qkv, table, kernel_size, dilation, scale)[0]
    return kernels[0](qkv, table, kernel_size, dilation, scale)[0]


@local_attention.register_fake
def _(qkv: torch.Tensor, table: torch.Tensor, kernel_size: int, dilation: int, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[:1] + qkv.shape[2:])


def _forward_macs(qkv_shape: torch.Size, kernel_size: int) -> int:
    """Multiply-accumulates of the attention's forward pass: ``q . k_o`` and ``attn_o * v_o`` for each of the
    ``k^d`` offsets plus the factorised relative logits (``k`` embeddings per axis, each over that axis' share of the
    head channels), per channel and position."""
    batch, _, heads, head_channels, *spatial = qkv_shape
    return batch * math.prod(spatial) * heads * head_channels * (2 * kernel_size ** len(spatial) + kernel_size)


# FLOPs (2 per multiply-accumulate) for torch.utils.flop_counter.FlopCounterMode, which cannot see into the kernels
@register_flop_formula([torch.ops.monai_qsa.local_attention, torch.ops.monai_qsa.local_attention_forward])
def _forward_flops(qkv_shape, table_shape, kernel_size: int, dilation: int, scale: float, out_shape=None) -> int:
    return 2 * _forward_macs(qkv_shape, kernel_size)


@register_flop_formula(torch.ops.monai_qsa.local_attention_backward)
def _backward_flops(
    grad_shape, qkv_shape, table_shape, saved_out_shape, lse_shape, kernel_size: int, dilation: int, scale: float,
    out_shape=None,
) -> int:  # fmt: skip
    """The backward pass: logits and ``g . v_o`` recomputed, then ``dq``, ``dk``, ``dv`` (``5 k^d``) and the
    relative logits' ``dq`` and table gradient (``2 k``), per channel and position."""
    batch, _, heads, head_channels, *spatial = qkv_shape
    return 2 * batch * math.prod(spatial) * heads * head_channels * (5 * kernel_size ** len(spatial) + 2 * kernel_size)
