"""Int8 attention in int8 programs: calibrate the q/k/v ranges of each SASA attention node and swap the fp32
operator ``torch.ops.monai_qsa.local_attention`` for ``torch.ops.monai_qsa.local_attention_int8``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from monai_qsa.networks.blocks.local_attention_int8 import symmetric_scale
from monai_qsa.quantization.calibration import calibrate_swaps

__all__ = ["AttentionRangeObserver", "observe_attention", "quantize_attention_int8"]


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
