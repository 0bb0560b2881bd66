"""The int8 resolution restore and head of SAUNets in int8 programs: the graph pass that puts
``torch.ops.monai_qsa.restore_head_int8`` in (:mod:`monai_qsa.networks.blocks.restore_head_int8`)."""

from __future__ import annotations

import operator

import torch

from monai_qsa.networks.blocks.restore_head_int8 import check_restore_head_arguments

__all__ = ["fuse_restore_heads"]

_QUANTIZE = "quantize_per_tensor"
_DEQUANTIZE = "dequantize_per_tensor"


def fuse_restore_heads(program: torch.fx.GraphModule) -> int:
    """Replace each SAUNet resolution restore + head of an int8 program by one ``restore_head_int8`` node, in
    place: the nodes from the upsampling convolution's output to the head's output, that is ``pixel_shuffle``
    (``pixel_shuffle_3d``), the crop/pad to the image size, ``cat`` with the image, the uint8 quantisation, the
    3x3(x3) convolution (its batch norm folded in by ``convert_pt2e``), ReLU, the uint8 requantisation and the
    1x1(x1) head, each used by the next only. 3D programs qualify when their convolutions compute in int8
    (``conv3d_int8``, ``quantize_ptq(int8_conv3d=True)``). The operator takes the program's quantisation points and
    stored int8 weights as they are: the same function up to the order of fp32 sums, computed in one pass (see the
    operator's module).

    Anything else (another activation or norm, 3D convolutions computed in fp32, a head that is not 1x1(x1),
    per-channel weights with zero points, sizes the operator does not take, e.g. more than 16 refined channels) is
    left as it is.

    Returns:
        the number of restore + head subgraphs fused.
    """
    fused = 0
    for node in list(program.graph.nodes):
        arguments = _restore_head(program, node)
        if arguments is None:
            continue
        with program.graph.inserting_before(node):
            fused_node = program.graph.call_function(torch.ops.monai_qsa.restore_head_int8.default, arguments)
        fused_node.meta.update(node.meta)
        node.replace_all_uses_with(fused_node)
        program.graph.erase_node(node)
        fused += 1
    if fused:
        program.graph.eliminate_dead_code()
        program.recompile()
    return fused


def _is(node, name: str, arguments: int | None = None) -> bool:
    """Whether ``node`` is a call of the operator ``name`` (``aten`` or ``quantized_decomposed``) with positional
    arguments only (``arguments`` of them if given)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.kwargs:
        return False
    target = getattr(node.target, "_schema", None)
    if arguments is not None and len(node.args) != arguments:
        return False
    return target is not None and target.name.split("::")[-1] == name


def _sole_input(node: torch.fx.Node, index: int = 0):
    """Argument ``index`` of ``node`` when that is a node used by ``node`` only, else None."""
    source = node.args[index] if len(node.args) > index else None
    return source if isinstance(source, torch.fx.Node) and list(source.users) == [node] else None


def _uint8_quantization(quantized) -> tuple | None:
    """``(fp32 value, scale, zero point)`` of a per-tensor uint8 quantisation (constant scale and zero point) of a
    value that nothing else uses; None otherwise."""
    if not _is(quantized, _QUANTIZE, 6) or _sole_input(quantized) is None:
        return None
    value, scale, zero_point, low, high, dtype = quantized.args
    if (low, high, dtype) != (0, 255, torch.uint8) or not isinstance(scale, float) or not isinstance(zero_point, int):
        return None
    return value, scale, zero_point


def _quantized_input(conv: torch.fx.Node) -> tuple | None:
    """``(fp32 input, scale, zero point)`` of a convolution whose input is a uint8 quantise/dequantise pair of a
    value that nothing else uses; None otherwise."""
    dequantized = _sole_input(conv)
    quantized = _sole_input(dequantized) if _is(dequantized, _DEQUANTIZE, 6) else None
    if quantized is None or quantized.args[1:] != dequantized.args[1:]:
        return None
    return _uint8_quantization(quantized)


def _int8_weight(program: torch.fx.GraphModule, node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(int8 weight, per-channel scales)`` nodes of a stored weight dequantised per output channel with zero
    zero points; None otherwise."""
    if not _is(node, "dequantize_per_channel", 7):
        return None
    weight, scales, zero_points, axis, low, high, dtype = node.args
    stored = [n for n in (weight, scales, zero_points) if isinstance(n, torch.fx.Node) and n.op == "get_attr"]
    if len(stored) != 3 or axis != 0 or (low, high, dtype) != (-128, 127, torch.int8):
        return None
    if bool(operator.attrgetter(zero_points.target)(program).any()):
        return None
    return weight, scales


def _conv_arguments(conv: torch.fx.Node, padding: int) -> tuple | None:
    """``(weight node, bias)`` of a 2D convolution of stride 1, the given padding, no dilation or groups."""
    if not _is(conv, "conv2d"):
        return None
    defaults = [None, [1, 1], [0, 0], [1, 1], 1]  # conv2d(input, weight, bias, stride, padding, dilation, groups)
    _, weight, bias, stride, pad, dilation, groups = list(conv.args) + defaults[len(conv.args) - 2 :]
    expand = lambda value: list(value) * (2 // len(value)) if isinstance(value, (list, tuple)) else [value] * 2  # noqa: E731
    if expand(stride) != [1, 1] or expand(pad) != [padding] * 2 or expand(dilation) != [1, 1] or groups != 1:
        return None
    return weight, bias


def _refinement_2d(program: torch.fx.GraphModule, head: torch.fx.Node) -> tuple | None:
    """``(refinement input, its scale, its zero point, refine weight, its scales, refine bias, mid scale, mid zero
    point, head weight, its scales, head bias)`` of a 2D program's refinement + ReLU + head ending in ``head``: int8
    convolutions as ``convert_pt2e`` leaves them (quantise, dequantise, ``conv2d`` of dequantised int8 weights);
    None if it is not one."""
    head_conv = _conv_arguments(head, padding=0)
    head_input = _quantized_input(head) if head_conv else None
    relu = head_input[0] if head_input else None
    refine = _sole_input(relu) if _is(relu, "relu") else None
    refine_conv = _conv_arguments(refine, padding=1) if refine is not None else None
    refine_input = _quantized_input(refine) if refine_conv else None
    if refine_input is None:
        return None
    head_weight, refine_weight = _int8_weight(program, head_conv[0]), _int8_weight(program, refine_conv[0])
    if head_weight is None or refine_weight is None:
        return None
    return *refine_input, *refine_weight, refine_conv[1], *head_input[1:], *head_weight, head_conv[1]


def _refinement_3d(head: torch.fx.Node) -> tuple | None:
    """:func:`_refinement_2d`'s tuple for a 3D program's: ``conv3d_int8`` nodes (stride 1, padding 1 and 0, stored
    int8 weights) whose inputs are uint8 quantisations used by them only; None if it is not one."""
    head_conv = _conv3d_int8_arguments(head, padding=0)
    relu = head_conv[0] if head_conv else None
    refine = _sole_input(relu) if _is(relu, "relu") else None
    refine_conv = _conv3d_int8_arguments(refine, padding=1) if refine is not None else None
    if refine_conv is None:
        return None
    return *refine_conv, *head_conv[1:]


def _conv3d_int8_arguments(conv: torch.fx.Node | None, padding: int) -> tuple | None:
    """``(fp32 input, scale, zero point, weight node, weight-scale node, bias)`` of a ``conv3d_int8`` node of stride
    1, the given padding and no dilation, whose uint8 input quantises a value with the node's own scale and zero
    point, nothing else using either; None otherwise."""
    if not _is(conv, "conv3d_int8", 9):
        return None
    quantized, scale, zero_point, weight, weight_scale, bias, stride, pad, dilation = conv.args
    if list(stride) != [1, 1, 1] or list(pad) != [padding] * 3 or list(dilation) != [1, 1, 1]:
        return None
    if not all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in (weight, weight_scale)):
        return None
    quantization = _uint8_quantization(_sole_input(conv))
    if quantization is None or quantization[1:] != (scale, zero_point):
        return None
    return *quantization, weight, weight_scale, bias


def _restore_head(program: torch.fx.GraphModule, head: torch.fx.Node) -> tuple | None:
    """The ``restore_head_int8`` arguments of the subgraph that ends in ``head`` (see :func:`fuse_restore_heads`);
    None if it is not one."""
    refinement = _refinement_2d(program, head) or _refinement_3d(head)
    if refinement is None:
        return None
    cat, in_scale, in_zero_point, *weights_and_points = refinement
    if not _is(cat, "cat") or cat.args[1:] != (1,) or len(cat.args[0]) != 2:
        return None
    upsampled, image = cat.args[0]
    consumer = cat
    if _is(upsampled, "pad", 3) and list(upsampled.users) == [cat] and _far_side_replicate(*upsampled.args[1:]):
        consumer, upsampled = upsampled, upsampled.args[0]  # match_size: replicate-pad or crop at the far borders
    shuffles = _is(upsampled, "pixel_shuffle", 2) or _is(upsampled, "pixel_shuffle_3d", 2)
    if not shuffles or list(upsampled.users) != [consumer]:
        return None
    features, stride = upsampled.args
    arguments = (features, image, stride, in_scale, in_zero_point, *weights_and_points)
    return arguments if _operator_takes(program, arguments) else None


def _far_side_replicate(pad, mode) -> bool:
    """Whether ``aten.pad``'s arguments replicate-pad or crop the two or three spatial axes at their far ends only,
    as :func:`~monai_qsa.networks.nets.sa_unet.match_size` does (and the operator)."""
    return mode == "replicate" and isinstance(pad, (list, tuple)) and len(pad) in (4, 6) and not any(pad[0::2])


def _operator_takes(program: torch.fx.GraphModule, arguments: tuple) -> bool:
    """Whether the operator accepts ``arguments`` (the stored tensors as they are, the features and the image by
    their channel counts): the pass leaves alone what the operator would refuse at run time."""
    values = []
    for argument in arguments:
        if isinstance(argument, torch.fx.Node) and argument.op == "get_attr":
            argument = operator.attrgetter(argument.target)(program)
        elif isinstance(argument, torch.fx.Node):  # features or image: one position of their channels
            shape = _traced_channels(program, argument)
            if shape is None:
                return False
            argument = torch.zeros(1, shape[0], *[1] * (shape[1] - 2))
        values.append(argument)
    try:
        check_restore_head_arguments(*values)
    except ValueError:
        return False
    return True


def _traced_channels(program: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, int] | None:
    """``(channels, dimensions)`` of an fp32 tensor of the graph: from its traced value, or for a ``conv3d_int8``
    node (the int8 3D pass adds them untraced) from its stored weight; None if unknown."""
    traced = node.meta.get("val")
    if isinstance(traced, torch.Tensor):
        known = traced.dtype == torch.float32 and traced.ndim in (4, 5) and isinstance(traced.shape[1], int)
        return (traced.shape[1], traced.ndim) if known else None
    weight = node.args[3] if _is(node, "conv3d_int8", 9) else None
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return operator.attrgetter(weight.target)(program).shape[0], 5
    return None
