"""Rewrites of an exported graph, before ``prepare_pt2e``, so that X86InductorQuantizer's fusion patterns
(conv-bn-add-relu and friends) match networks written the usual PyTorch way. Neither changes what the graph
computes."""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["match_quantizer_patterns"]


def _out_of_place(graph_module: torch.fx.GraphModule) -> None:
    """Turn in-place ops (``relu_``, the ``add_`` of ``out += residual``, ...) into their out-of-place forms
    where nothing reads the overwritten tensor afterwards: the quantizer's patterns name out-of-place ops."""
    position = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.overloadpacket.__name__
        functional = (
            getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") and not name.startswith("_") else None
        )
        overload = getattr(functional, node.target._overloadname, None) if functional is not None else None
        mutated = node.args[0] if node.args else None
        if overload is None or not isinstance(mutated, torch.fx.Node) or mutated.op != "call_function":
            continue
        if all(position[user] <= position[node] for user in mutated.users):
            node.target = overload


def _separate_repeated_module_calls(graph_module: torch.fx.GraphModule) -> None:
    """Give each call of a module that is called several times (MONAI's ResNet blocks apply one ``self.act``
    twice) its own module path in ``nn_module_stack``: the quantizer groups nodes into partitions by module
    path, and a partition with two outputs makes it fail ("Input partition has more than one output node")."""
    calls: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            calls[list(stack.values())[-1][0]].append(node)
    for path, nodes in calls.items():
        if len(nodes) < 2 or len({node.target for node in nodes}) != 1:
            continue  # one call, or a module whose call is several different ops: leave it alone
        for index, node in enumerate(nodes[1:], start=1):
            stack = dict(node.meta["nn_module_stack"])
            key = list(stack)[-1]
            stack[key] = (f"{path}#call{index}", stack[key][1])
            node.meta["nn_module_stack"] = stack


def match_quantizer_patterns(graph_module: torch.fx.GraphModule) -> None:
    """Apply both rewrites to ``graph_module`` (from ``torch.export``) in place."""
    _out_of_place(graph_module)
    _separate_repeated_module_calls(graph_module)
    graph_module.recompile()
