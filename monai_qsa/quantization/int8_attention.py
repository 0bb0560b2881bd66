"""Int8 attention in int8 programs: calibrate the q/k/v ranges of each SASA attention node and swap the fp32
operator ``torch.ops.monai_qsa.local_attention`` for ``torch.ops.monai_qsa.local_attention_int8``; then fuse each
layer's query/key/value projection into it (``torch.ops.monai_qsa.projected_local_attention_int8``)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch

from monai_qsa.networks.blocks.local_attention_int8 import symmetric_scale
from monai_qsa.quantization.calibration import calibrate_swaps

__all__ = ["AttentionRangeObserver", "fuse_attention_projections", "observe_attention", "quantize_attention_int8"]


class AttentionRangeObserver(torch.nn.Module):
    """Records the largest magnitude of the queries, keys and values (``amax``, 3 values) of the projections
    ``(B, 3, heads, d_head, *S)`` it sees, and passes them on unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros(3))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        other_axes = tuple(axis for axis in range(qkv.ndim) if axis != 1)
        self.amax = torch.maximum(self.amax, qkv.detach().abs().amax(dim=other_axes).float())
        return qkv


def quantize_attention_int8(
    program: torch.fx.GraphModule,
    calibration_data: Iterable,
    num_batches: int | None = None,
    image_key: str = "image",
    inferer: Callable | None = None,
) -> int:
    """Swap every ``torch.ops.monai_qsa.local_attention`` node of ``program`` for ``local_attention_int8``, with
    per-tensor q/k/v scales calibrated on ``calibration_data``, in place.

    Observers (:class:`AttentionRangeObserver`) are inserted before each attention node, the batches are run, and
    each node is rewritten with the scales :func:`symmetric_scale` gives for the observed ranges; the observers are
    then removed. Run it on an int8 program (e.g. ``quantize_ptq(...).program``, after ``convert_pt2e``): the ranges
    are then those of the int8 convolutions' outputs that the operator will see.

    Args:
        program: an exported graph module with ``local_attention`` nodes.
        calibration_data: as for ``quantize_ptq``: tensors, ``(input, target)`` tuples or MONAI dict batches.
        num_batches: calibrate on at most this many batches (default: all).
        image_key: the input's key in dict batches.
        inferer: calibrate through ``inferer(batch, program)`` (e.g. a sliding window) instead of ``program(batch)``.

    Returns:
        the number of attention nodes swapped.

    Raises:
        ValueError: no calibration batch, or an attention node that no batch reached (zero range).
    """
    return calibrate_swaps(program, [observe_attention(program)], calibration_data, num_batches, image_key, inferer)[0]


def observe_attention(program: torch.fx.GraphModule) -> Callable[[bool], int] | None:
    """Insert an :class:`AttentionRangeObserver` before each ``local_attention`` node of ``program`` (None if it has
    none); after calibration, ``finish(True)`` swaps the nodes for ``local_attention_int8`` with the observed scales,
    and ``finish(False)`` only removes the observers. ``finish`` returns the number of nodes swapped."""
    nodes = [node for node in program.graph.nodes if node.target is torch.ops.monai_qsa.local_attention.default]
    if not nodes:
        return None
    observers = [_insert_observer(program, node, index) for index, node in enumerate(nodes)]

    def finish(swap: bool) -> int:
        try:
            amaxes = [program.get_submodule(name).amax for name, _ in observers] if swap else []
            for node, amax in zip(nodes, amaxes):
                if not bool((amax > 0).all()):
                    raise ValueError(
                        f"attention node {node.name}: the calibration data gave it all-zero q/k/v ({amax.tolist()})."
                    )
        finally:  # the program is left as it was, or fully converted
            for name, observed in observers:
                observed.replace_all_uses_with(observed.args[0])
                program.graph.erase_node(observed)
                program.delete_submodule(name)
        for node, amax in zip(nodes, amaxes):
            node.target = torch.ops.monai_qsa.local_attention_int8.default
            node.args = tuple(node.args) + tuple(symmetric_scale(value) for value in amax.tolist())
        return len(amaxes)

    return finish


def _insert_observer(program: torch.fx.GraphModule, node: torch.fx.Node, index: int) -> tuple[str, torch.fx.Node]:
    """An :class:`AttentionRangeObserver` between attention node ``node`` and its projection input."""
    name = f"monai_qsa_attention_observer_{index}"
    program.add_submodule(name, AttentionRangeObserver())
    with program.graph.inserting_before(node):
        observed = program.graph.call_module(name, (node.args[0],))
    node.replace_input_with(node.args[0], observed)
    return name, observed


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)


def fuse_attention_projections(program: torch.fx.GraphModule) -> int:
    """Replace each ``local_attention_int8`` node whose projection is a 1x1(x1) convolution used by nothing else by
    one ``projected_local_attention_int8`` node, in place: the kernel computes the projection from the convolution's
    fp32 input (the input the convolution quantised, at full precision) and its weights (the stored int8 weights,
    dequantised in the graph; Inductor folds that into a constant when freezing). One operator instead of two, and
    no projection written to memory and read back.

    Handles the convolutions of int8 programs: ``aten.conv2d``/``aten.conv3d`` (int8 in 2D after Inductor's
    lowering, weight-only in 3D) and ``monai_qsa.conv3d_int8``.

    Returns:
        the number of attention nodes fused.
    """
    graph = program.graph
    fused = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.monai_qsa.local_attention_int8.default:
            continue
        reshape = node.args[0]
        if not _sole_use(reshape, node) or reshape.target not in _RESHAPES or not _sole_use(reshape.args[0], reshape):
            continue
        projection = _pointwise_projection(program, reshape.args[0])
        if projection is None:
            continue
        x, weight, bias = projection
        with graph.inserting_before(node):
            fused_node = graph.call_function(
                torch.ops.monai_qsa.projected_local_attention_int8.default, (x, weight, bias, *node.args[1:])
            )
        fused_node.meta.update(node.meta)
        node.replace_all_uses_with(fused_node)
        graph.erase_node(node)
        fused += 1
    if fused:
        graph.eliminate_dead_code()
        program.recompile()
    return fused


def _sole_use(node, user: torch.fx.Node) -> bool:
    return isinstance(node, torch.fx.Node) and list(node.users) == [user]


def _pointwise_projection(program: torch.fx.GraphModule, conv) -> tuple | None:
    """``(fp32 input, fp32 weight node, bias)`` of a 1x1(x1) convolution node of stride 1 without padding, dilation
    or groups (inserting the weight's dequantisation for ``conv3d_int8``); None for anything else."""
    if not isinstance(conv, torch.fx.Node) or conv.op != "call_function":
        return None
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default  # registered by torchao's pt2e
    if conv.target is torch.ops.monai_qsa.conv3d_int8.default:
        quantized, _, _, weight, weight_scale, bias, stride, padding, dilation = conv.args
        if getattr(quantized, "target", None) is not quantize:
            return None
        if stride != [1, 1, 1] or padding != [0, 0, 0] or dilation != [1, 1, 1]:
            return None
        if (_constant_shape(program, weight) or (None,))[2:] != (1, 1, 1):
            return None
        with program.graph.inserting_before(conv):
            as_float = program.graph.call_function(torch.ops.aten._to_copy.default, (weight,), {"dtype": torch.float32})
            scales = program.graph.call_function(torch.ops.aten.reshape.default, (weight_scale, [-1, 1, 1, 1, 1]))
            dequantized = program.graph.call_function(torch.ops.aten.mul.Tensor, (as_float, scales))
        return quantized.args[0], dequantized, bias
    if conv.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default):
        return None
    dims = 2 if conv.target is torch.ops.aten.conv2d.default else 3
    defaults = [None, [1], [0], [1], 1]  # conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
    x, weight, bias, stride, padding, dilation, groups = list(conv.args) + defaults[len(conv.args) - 2 :]
    if any(s != 1 for s in stride) or any(padding) or any(d != 1 for d in dilation) or groups != 1:
        return None
    weight_shape = _constant_shape(program, weight)
    if weight_shape is None or tuple(weight_shape[2:]) != (1,) * dims:
        return None
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    if getattr(x, "target", None) is dequantize and getattr(x.args[0], "target", None) is quantize:
        x = x.args[0].args[0]  # the input before its int8 rounding
    return x, weight, bias


def _constant_shape(program: torch.fx.GraphModule, node) -> tuple[int, ...] | None:
    """The shape of a stored tensor (``get_attr``) or of its per-channel dequantisation; None for anything else."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return tuple(operator.attrgetter(node.target)(program).shape)
    if node.target is torch.ops.quantized_decomposed.dequantize_per_channel.default:
        return _constant_shape(program, node.args[0])
    return None
