"""3D pixel shuffle as one operator: ``torch.ops.monai_qsa.pixel_shuffle_3d``.

PyTorch has ``F.pixel_shuffle`` for 2D maps only. Written in PyTorch operations (reshape, permute, reshape) the 3D
shuffle is the same function, but ``torch.export`` cannot capture it for dynamic sizes: the exporter fails to prove
a contiguity guard it generates for the permuted strides. As one operator (with its shape function and its
gradient, the inverse shuffle) every exporter, compiler and training loop sees a single node of known output size.
"""

from __future__ import annotations

import torch

__all__ = ["pixel_shuffle_3d", "pixel_unshuffle_3d"]


def _check(operator: str, x: torch.Tensor, stride: int, cells_in_channels: bool) -> None:
    """Raise ``ValueError`` unless ``stride`` is a positive int and ``x`` is 5-D, with channels divisible by
    ``stride ** 3`` when ``cells_in_channels`` (a model file chooses them)."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"monai_qsa.{operator}: stride must be a positive int, got {stride!r}.")
    multiple = stride**3 if cells_in_channels else 1
    if x.ndim != 5 or x.shape[1] % multiple:
        channels = f" with C divisible by {multiple}" if cells_in_channels else ""
        raise ValueError(f"monai_qsa.{operator}: x must be (B, C, D, H, W){channels}, got shape {tuple(x.shape)}.")


def pixel_unshuffle_3d(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The inverse of :func:`pixel_shuffle_3d`: ``(B, C, D * s, H * s, W * s)`` to ``(B, C * s ** 3, D, H, W)``."""
    _check("pixel_unshuffle_3d", x, stride, cells_in_channels=False)
    batch, channels, depth, height, width = x.shape
    if depth % stride or height % stride or width % stride:
        raise ValueError(f"monai_qsa.pixel_unshuffle_3d: sizes {tuple(x.shape[2:])} must be divisible by {stride}.")
    cells = x.reshape(batch, channels, depth // stride, stride, height // stride, stride, width // stride, stride)
    cells = cells.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return cells.reshape(batch, channels * stride**3, depth // stride, height // stride, width // stride)


@torch.library.custom_op("monai_qsa::pixel_shuffle_3d", mutates_args=())
def pixel_shuffle_3d(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.pixel_shuffle`` in 3D: ``(B, C * s ** 3, D, H, W)`` to ``(B, C, D * s, H * s, W * s)``, channel
    ``c * s ** 3 + (i * s + j) * s + l`` going to offset ``(i, j, l)`` of each output cell.

    Raises:
        ValueError: ``x`` not 5-D, channels not divisible by ``stride ** 3``, or ``stride`` not a positive int.
    """
    _check("pixel_shuffle_3d", x, stride, cells_in_channels=True)
    batch, channels, depth, height, width = x.shape
    cells = x.reshape(batch, channels // stride**3, stride, stride, stride, depth, height, width)
    out = x.new_empty((batch, channels // stride**3, depth * stride, height * stride, width * stride))
    # one copy into a new tensor (a custom operator's output may not alias its input, as a reshape could)
    out.view(batch, -1, depth, stride, height, stride, width, stride).copy_(cells.permute(0, 1, 5, 2, 6, 3, 7, 4))
    return out


@pixel_shuffle_3d.register_fake
def _(x: torch.Tensor, stride: int) -> torch.Tensor:
    _check("pixel_shuffle_3d", x, stride, cells_in_channels=True)
    batch, channels, depth, height, width = x.shape
    return x.new_empty((batch, channels // stride**3, depth * stride, height * stride, width * stride))


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.stride = inputs[1]


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return pixel_unshuffle_3d(grad, ctx.stride), None


pixel_shuffle_3d.register_autograd(_backward, setup_context=_setup_context)
