"""Static post-training int8 quantisation of SA networks and MONAI CNNs, calibrated on real batches."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from monai_qsa.quantization.calibration import calibrate, calibrate_swaps, calibration_tensors, reiterable
from monai_qsa.quantization.graph_prep import match_quantizer_patterns
from monai_qsa.quantization.int8_attention import fuse_attention_projections, observe_attention
from monai_qsa.quantization.int8_conv3d import observe_conv3d
from monai_qsa.quantization.int8_restore import fuse_restore_heads
from monai_qsa.utils.third_party import import_torchao_pt2e

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "InferenceGraph", "quantize_ptq"]

#: ``x86_inductor``: PT2E (torch.export + torchao X86InductorQuantizer), run through torch.compile;
#: ``x86_eager``: torch.ao eager-mode static quantisation, no compiler needed.
BACKENDS = ("x86_inductor", "x86_eager")


@contextlib.contextmanager
def quiet_ao_deprecations() -> Iterator[None]:
    """Hide torch.ao's deprecation notices for eager quantisation; other warnings and all errors still surface."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao(\..*)?")
        warnings.filterwarnings(
            "ignore", message=r".*(torch\.ao\.quantization|quantized tensor creation|reduce_range).*"
        )
        yield


def _is_image(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim > 2


def _input_dynamic_shapes(example_inputs: tuple, spatial: bool = True) -> tuple:
    """Batch size, and with ``spatial`` the image size, of each image input may vary; channels are fixed."""
    auto = torch.export.Dim.AUTO
    return tuple(
        {d: auto for d in range(x.ndim) if d == 0 or (spatial and d > 1)} if _is_image(x) else None
        for x in example_inputs
    )


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@torch.no_grad()  # as inference runs: SA layers then capture their fused attention operator
def export_for_quantization(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` with batch and spatial sizes left dynamic; a clear error when the model cannot be exported.

    Networks that only work for some image sizes (MONAI ``UNet`` needs sizes divisible by its total stride) cannot
    be captured for every size: they are exported for the example's image size (batch size still free), with a
    warning; sliding-window inference feeds them that size.
    """
    # torch.export specialises dimensions of size 1, so a batch of one would fix the batch size: export on two
    example_inputs = tuple(
        x.repeat(2, *[1] * (x.ndim - 1)) if _is_image(x) and x.shape[0] == 1 else x for x in example_inputs
    )
    try:
        return torch.export.export(model, example_inputs, dynamic_shapes=_input_dynamic_shapes(example_inputs))
    except Exception as error:
        any_size_error = error
    try:
        program = torch.export.export(
            model, example_inputs, dynamic_shapes=_input_dynamic_shapes(example_inputs, spatial=False)
        )
    except Exception:
        raise ValueError(
            f"{type(model).__name__} cannot be captured by torch.export, which the x86_inductor backend needs: "
            f"{_first_line(any_size_error)}. Use backend='x86_eager'."
        ) from any_size_error
    sizes = [tuple(x.shape[2:]) for x in example_inputs if _is_image(x)]
    logger.warning(
        f"{type(model).__name__} is exported for image size {sizes} only (for any size: {_first_line(any_size_error)})"
    )
    return program


class InferenceGraph(nn.Module):
    """An int8 graph captured by ``torch.export``, as an inference-only module.

    Exported graphs are fixed in inference mode and refuse ``train()``/``eval()``, which MONAI engines call
    (``SupervisedEvaluator`` runs its network under ``eval_mode``); here both only set the ``training`` flag.

    Args:
        program: the graph module (``convert_pt2e`` output, or ``ExportedProgram.module()``).
        backend: the quantisation backend that produced it, kept as ``monai_qsa_backend``.
    """

    def __init__(self, program: nn.Module, backend: str) -> None:
        super().__init__()
        self.program = program
        self.monai_qsa_backend = backend
        self.training = False

    def train(self, mode: bool = True) -> InferenceGraph:
        self.training = mode
        return self

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.program(*args)


#: convolutions that ``X86InductorQuantizer`` leaves fp32, with the weight axis of their output channels:
#: transposed convolutions (U-Net upsampling) and 3D convolutions (Inductor lowers int8 convolutions in 2D only)
_WEIGHT_ONLY_CONVOLUTIONS = {
    torch.ops.aten.conv_transpose2d.input: 1,
    torch.ops.aten.conv_transpose3d.input: 1,
    torch.ops.aten.conv3d.default: 0,
}


def _weight_only_int8_convolutions(graph_module: torch.fx.GraphModule) -> int:
    """Store the weights of the convolutions ``X86InductorQuantizer`` leaves fp32 (see
    ``_WEIGHT_ONLY_CONVOLUTIONS``) as per-channel int8 dequantised inside the graph: weight-only quantisation, the
    arithmetic stays fp32, the file shrinks 4x, and Inductor folds the dequantisation into a constant when freezing.

    Returns:
        the number of 3D (non-transposed) convolutions so stored.
    """
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    weight_only_3d = 0
    for node in list(graph_module.graph.nodes):
        axis = _WEIGHT_ONLY_CONVOLUTIONS.get(node.target)
        if axis is None or node.args[1].op != "get_attr" or (node.args[6:7] or [1])[0] != 1:
            continue  # not such a convolution with stored weights, or a grouped one (kept fp32)
        if axis == 1 and any((node.args[5:6] or [[0]])[0]):
            continue  # output_padding (MONAI UNet's up-sampling): Inductor's int8 lowering fails on it, kept fp32
        weight_node = node.args[1]
        weight = operator.attrgetter(weight_node.target)(graph_module).detach()
        reduce_dims = [d for d in range(weight.ndim) if d != axis]
        scale = (weight.abs().amax(dim=reduce_dims) / 127).clamp_min(1e-12)
        shape = [1] * weight.ndim
        shape[axis] = -1
        int8 = (weight / scale.reshape(shape)).round().clamp(-128, 127).to(torch.int8)
        prefix = weight_node.target.replace(".", "_")
        for suffix, tensor in (
            ("int8", int8),
            ("scale", scale),
            ("zero_point", torch.zeros_like(scale, dtype=torch.int64)),
        ):
            graph_module.register_buffer(f"{prefix}_{suffix}", tensor)
        with graph_module.graph.inserting_before(node):
            inputs = [graph_module.graph.get_attr(f"{prefix}_{suffix}") for suffix in ("int8", "scale", "zero_point")]
            dequantized = graph_module.graph.call_function(dequantize, (*inputs, axis, -128, 127, torch.int8))
        node.replace_input_with(weight_node, dequantized)
        weight_only_3d += axis == 0
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return weight_only_3d


def _quantize_pt2e(
    model: nn.Module, batches: Callable[[], Iterator[torch.Tensor]], example_inputs: tuple, inferer: Callable | None,
    int8_attention: bool, int8_conv3d: bool, fuse_projections: bool, fuse_restore_head: bool,
) -> nn.Module:  # fmt: skip
    import_torchao_pt2e()  # first import without torchao's CUDA/Triton/pytree notices
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # the default config quantises conv/linear weights per channel; attention math is left in fp32
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The input of maxpool")  # maxpool after an fp32 op stays fp32
        graph_module = export_for_quantization(model, example_inputs).module()
        match_quantizer_patterns(graph_module)
        prepared = prepare_pt2e(graph_module, quantizer)
    calibrate(prepared, batches(), inferer)
    with _without_qat_conv_bn_folding():
        converted = convert_pt2e(prepared)
    weight_only_3d = _weight_only_int8_convolutions(converted)
    # one more calibration pass, on the int8 program, for the int8 attention's q/k/v scales and the int8 3D
    # convolutions' input ranges together
    finishers = [observe_attention(converted) if int8_attention else None]
    finishers.append(observe_conv3d(converted) if int8_conv3d else None)
    weight_only_3d -= calibrate_swaps(converted, finishers, batches(), inferer=inferer)[1]
    if int8_attention and fuse_projections:
        fuse_attention_projections(converted)
    if fuse_restore_head:
        fuse_restore_heads(converted)
    if weight_only_3d:
        logger.warning(
            f"x86_inductor: {weight_only_3d} 3D convolutions are stored in int8 but computed in fp32 "
            "(int8_conv3d=True computes them in int8, see docs/quantization.md)."
        )
    _drop_unused_tensors(converted)
    return InferenceGraph(converted, "x86_inductor")


@contextlib.contextmanager
def _without_qat_conv_bn_folding() -> Iterator[None]:
    """Skip the folding of quantisation-aware-training conv-bn patterns in ``convert_pt2e``: graphs prepared by
    ``prepare_pt2e`` (post-training) never hold them (``prepare_pt2e`` folds batch norms into the convolutions
    before them), but whenever any batch norm is left (SAUNet's after attention) torchao exports its ~100 pattern
    graphs to look for them: about a minute on 2 cores, most of the int8 step's calibration time."""
    from torchao.quantization.pt2e import quantize_pt2e

    original = getattr(quantize_pt2e, "_fold_conv_bn_qat", None)
    if original is None:  # another torchao layout: leave it as it is
        yield
        return
    quantize_pt2e._fold_conv_bn_qat = lambda graph_module: graph_module
    try:
        yield
    finally:
        quantize_pt2e._fold_conv_bn_qat = original


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers the converted graph no longer reads (the fp32 originals of the int8
    weights), so they are neither kept in memory nor saved with the artifact."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(itertools.chain(graph_module.named_parameters(), graph_module.named_buffers())):
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner_name) if owner_name else graph_module, attr)


def _fold_batch_norms(model: nn.Module) -> None:
    """Fold each BatchNorm that directly follows a convolution in a ``Sequential`` (MONAI ``Convolution`` blocks
    keep it in ``adn.N``) into that convolution."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for module in model.modules():
        conv, adn = getattr(module, "conv", None), getattr(module, "adn", None)
        if isinstance(conv, convs) and adn is not None and isinstance(getattr(adn, "N", None), norms):
            module.conv, adn.N = fuse_conv_bn_eval(conv, adn.N), nn.Identity()
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if isinstance(module._modules[first], convs) and isinstance(module._modules[second], norms):
                    module._modules[first] = fuse_conv_bn_eval(module._modules[first], module._modules[second])
                    module._modules[second] = nn.Identity()


def _wrap_quantizable(model: nn.Module, qconfig) -> None:
    """Put every convolution and linear layer between a QuantStub and a DeQuantStub: int8 islands in an fp32 model,
    so attention, normalisation and residual additions stay fp32 without rewriting the network."""
    from torch.ao.quantization import QuantWrapper

    quantizable = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in quantizable:
                wrapper = QuantWrapper(child)
                wrapper.qconfig = qconfig
                setattr(parent, name, wrapper)


def _quantize_eager(model: nn.Module, batches: Iterator[torch.Tensor], inferer: Callable | None) -> nn.Module:
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    if "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"the x86 quantized engine is not available (supported: {torch.backends.quantized.supported_engines})."
        )
    torch.backends.quantized.engine = "x86"
    with quiet_ao_deprecations():
        _fold_batch_norms(model)
        _wrap_quantizable(model, get_default_qconfig("x86"))
        prepare(model, inplace=True)
        calibrate(model, batches, inferer)
        convert(model, inplace=True)
    return model


def quantize_ptq(
    model: nn.Module,
    calibration_data: Iterable,
    example_inputs: torch.Tensor | tuple,
    backend: str = "x86_inductor",
    num_batches: int | None = None,
    image_key: str = "image",
    inferer: Callable | None = None,
    int8_attention: bool = True,
    int8_conv3d: bool = False,
    fuse_projections: bool = True,
    fuse_restore_head: bool = True,
) -> nn.Module:
    """
    Static post-training int8 quantisation, calibrated on real batches. Convolutions (the SASA query/key/value
    projections included) and linear layers become int8 with per-channel weights. With ``x86_inductor`` and
    ``int8_attention``, the SASA attention core runs int8 too (``torch.ops.monai_qsa.local_attention_int8``: int8
    logits and weighted sum, fp32 softmax, per-layer q/k/v scales from a second calibration pass), each layer one
    node with its projection (``torch.ops.monai_qsa.projected_local_attention_int8``); otherwise the logits, softmax
    and weighted sum stay fp32. With ``x86_inductor``, 3D convolutions (which its quantiser leaves
    fp32) compute in int8 with ``int8_conv3d=True``, otherwise they and transposed convolutions get int8 weights
    dequantised in the graph. ``model`` itself is left unchanged.

    Args:
        model: trained fp32 network (SAResNet, SAUNet, or a MONAI CNN such as BasicUNet, UNet, resnet18).
        calibration_data: iterable of input tensors, ``(input, target)`` pairs or MONAI dict batches
            (e.g. the validation ``DataLoader``).
        example_inputs: one input tensor or a tuple of positional inputs, used to capture the graph.
        backend: ``"x86_inductor"`` (PT2E through torchao, then run it through
            :func:`monai_qsa.utils.compile.compile_for_cpu` with ``freezing=True`` for speed) or ``"x86_eager"``
            (torch.ao eager quantisation, needs no compiler).
        num_batches: calibrate on at most this many batches (all by default).
        image_key: key of the input in dict batches.
        inferer: calibrate through ``inferer(batch, model)`` (e.g. a MONAI ``SlidingWindowInferer``, so that
            calibration sees the patches the network sees in deployment) instead of ``model(batch)``.
        int8_attention: ``x86_inductor`` only: compute the SASA attention core in int8 as well (see above);
            ``x86_eager`` always keeps it fp32.
        int8_conv3d: ``x86_inductor`` only: compute 3D convolutions in int8 (oneDNN through
            ``torch.ops.monai_qsa.conv3d_int8``, input ranges from the same calibration pass as the attention's);
            otherwise (default: measured slower end to end on the 3D SAUNet, see docs/quantization.md) their int8
            weights are dequantised and they compute in fp32.
        fuse_projections: with ``int8_attention``: compute each SASA layer's query/key/value projection in the
            attention's kernel, from the layer's fp32 input (default; measured 1.16-1.30x faster networks, see
            docs/int8_attention.md), instead of as an int8 convolution of its own.
        fuse_restore_head: ``x86_inductor`` only: compute a SAUNet's resolution restore and head (pixel shuffle,
            image skip, 3x3(x3) int8 refinement + ReLU, 1x1(x1) int8 head) as one operator,
            ``torch.ops.monai_qsa.restore_head_int8`` (default; in 3D with ``int8_conv3d``; the same quantisation
            points and int8 weights, up to the order of fp32 sums, see docs/int8_attention.md).

    Returns:
        the int8 model in eval mode (an :class:`InferenceGraph` for ``x86_inductor``, the rewritten module for
        ``x86_eager``); ``monai_qsa_backend`` names the backend.

    Raises:
        ValueError: unknown backend, no calibration batch, or a model torch.export cannot capture.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model = copy.deepcopy(model).eval()
    if backend == "x86_inductor":
        data = reiterable(calibration_data, num_batches)
        batches = functools.partial(calibration_tensors, data, num_batches, image_key)  # one pass per calibration
        return _quantize_pt2e(
            model, batches, example_inputs, inferer, int8_attention, int8_conv3d, fuse_projections, fuse_restore_head
        )
    qmodel = _quantize_eager(model, calibration_tensors(calibration_data, num_batches, image_key), inferer)
    qmodel.monai_qsa_backend = backend
    return qmodel
