"""The one place that turns a trained model file into a runnable network: an fp32 checkpoint loaded into its
network (``weights_only``: no pickled code is run), or an int8 artifact, optionally compiled for the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_checkpoint", "runnable_network"]


def load_checkpoint(network: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by MONAI's ``CheckpointSaver`` (or ``torch.save(network.state_dict())``) into
    ``network``: either the network's own ``state_dict`` (one object saved) or a dict holding it under some key
    (several objects saved, e.g. ``{"network": ..., "optimizer": ...}``).

    Only tensors and plain containers are read (``torch.load(weights_only=True)``).

    Returns:
        ``network``, with the weights loaded, in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` is not a readable checkpoint or holds no state_dict of ``network``.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist.")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{checkpoint} is not a readable checkpoint: {type(error).__name__}: {error}") from error
    expected = set(network.state_dict())
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state_dict.")
    if not expected <= set(state):
        nested = [value for value in state.values() if isinstance(value, dict) and expected <= set(value)]
        if not nested:
            raise ValueError(
                f"checkpoint {checkpoint} holds no state_dict of {type(network).__name__} (keys: {sorted(state)[:6]})."
            )
        state = nested[0]
    network.load_state_dict(state)
    return network.eval()


def runnable_network(
    path: str | os.PathLike, network: nn.Module | None = None, int8: bool = False, compile: bool = False
) -> nn.Module:
    """The network to run for a model file: ``network`` with the fp32 checkpoint ``path`` loaded
    (:func:`load_checkpoint`), or the int8 artifact ``path``
    (:func:`monai_qsa.quantization.load_quantized`, ``network`` unused); optionally compiled with
    :func:`monai_qsa.utils.compile.compile_for_cpu` (with freezing for int8, as its graphs need).

    Args:
        path: ``model.pt`` (fp32 checkpoint) or ``model_int8.pt2`` (int8 artifact).
        network: the network definition the fp32 checkpoint belongs to (required unless ``int8``).
        int8: ``path`` is an int8 artifact.
        compile: compile for the CPU (faster; the first call of each input shape compiles).

    Returns:
        the network in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a model of the requested kind, or no ``network`` is given for an fp32 checkpoint.

    Example::

        net = runnable_network("models/model.pt", SAUNet(2, 1, 2))
        int8_net = runnable_network("models/model_int8.pt2", int8=True, compile=True)
    """
    from monai_qsa.quantization import load_quantized
    from monai_qsa.utils.compile import compile_for_cpu

    if int8:
        model = load_quantized(path)
    elif network is None:
        raise ValueError(f"loading the fp32 checkpoint {path} needs the network it belongs to (network=).")
    else:
        model = load_checkpoint(network, path)
    return compile_for_cpu(model, freezing=int8) if compile else model
