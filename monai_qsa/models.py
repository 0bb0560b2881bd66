"""The one place that turns a trained model file into a runnable network: an fp32 checkpoint loaded into its
network (``weights_only``: no pickled code is run), or an int8 artifact, optionally compiled for the CPU.

A checkpoint carries the definition of the network it was trained with (:class:`NetworkDefinition`, saved by the
bundles' ``CheckpointSaver`` next to the weights), so a model trained with ``--network_def ...`` overrides is served as
trained by every consumer (``python -m monai_qsa infer``, ``inference.json``, the benchmark)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from pydoc import locate

import torch
from torch import nn

__all__ = [
    "NetworkDefinition",
    "network_definition",
    "build_network",
    "recorded_network_definition",
    "load_checkpoint",
    "runnable_network",
]

logger = logging.getLogger(__name__)

DEFINITION_KEY = "network_def"
"""Entry of a checkpoint holding the network definition (the ``save_dict`` key of :class:`NetworkDefinition`)."""

BUILDABLE_PACKAGE = "monai_qsa.networks."
"""Package a recorded ``_target_`` must be defined in: a file can name one of our networks, never other code."""


def network_definition(network: nn.Module) -> dict:
    """The bundle-config ``network_def`` that rebuilds ``network``: its class and the arguments it recorded
    (networks decorated with :func:`monai_qsa.networks.arguments.records_arguments`); empty for networks that
    record none."""
    arguments = getattr(network, "arguments", None)
    if not isinstance(arguments, dict):
        return {}
    cls = type(network)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **_plain(arguments)}


class NetworkDefinition:
    """The definition of a network as a checkpoint entry: put it in a ``CheckpointSaver``'s ``save_dict`` beside the
    network (``{"network": @network, "network_def": {"_target_": "monai_qsa.models.NetworkDefinition", "network":
    @network}}``) and the saved file records how to rebuild the network it holds.

    Args:
        network: the network being trained.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict:
        return network_definition(self.network)

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore when resuming: the network is rebuilt from the config."""


def build_network(definition: dict, source: str | os.PathLike = "the definition") -> nn.Module:
    """The network a recorded definition describes, built without evaluating anything from it: ``_target_`` must
    be a network class defined in ``monai_qsa.networks`` and the arguments plain values (strings are passed as
    strings, never evaluated as config expressions).

    Raises:
        ValueError: the definition names something else or its arguments do not fit the class, naming ``source``.
    """
    target = definition.get("_target_")
    cls = locate(target) if isinstance(target, str) and target.startswith(BUILDABLE_PACKAGE) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith(BUILDABLE_PACKAGE)):
        raise ValueError(f"{source}: the recorded network {target!r} is not a network class of monai_qsa.networks.")
    arguments = {name: value for name, value in definition.items() if name != "_target_"}
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: cannot build the recorded network {target}: {error}") from error


def recorded_network_definition(checkpoint: str | os.PathLike) -> dict:
    """The network definition a checkpoint records (empty if it records none, e.g. checkpoints of older versions).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` is not a readable checkpoint.
    """
    definition = _read_checkpoint(Path(checkpoint)).get(DEFINITION_KEY)
    return definition if isinstance(definition, dict) else {}


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
    state = _read_checkpoint(checkpoint)
    # the checkpoint itself or one of the objects saved in it; the network decides (its modules may convert
    # parameters saved in an earlier layout, e.g. PixelShuffleUpsample)
    reasons = []
    for candidate in [state] + [value for value in state.values() if isinstance(value, dict)]:
        try:
            network.load_state_dict(candidate)
        except RuntimeError as error:
            reasons.append(str(error).splitlines()[-1].strip()[:300])
            continue
        return network.eval()
    raise ValueError(
        f"checkpoint {checkpoint} holds no state_dict of {type(network).__name__} (keys: {sorted(state)[:6]}; "
        f"closest: {min(reasons, key=len)})."
    )


def runnable_network(
    path: str | os.PathLike, network: nn.Module | None = None, int8: bool = False, compile: bool = False
) -> nn.Module:
    """The network to run for a model file: the fp32 checkpoint ``path`` loaded (:func:`load_checkpoint`) into the
    network it records (:class:`NetworkDefinition`), else into ``network``; or the int8 artifact ``path``
    (:func:`monai_qsa.quantization.load_quantized`, ``network`` unused); optionally compiled with
    :func:`monai_qsa.utils.compile.compile_for_cpu` (with freezing for int8, as its graphs need).

    Args:
        path: ``model.pt`` (fp32 checkpoint) or ``model_int8.pt2`` (int8 artifact).
        network: the network the fp32 checkpoint belongs to, used when the checkpoint records no definition (a
            bundle's ``network_def``; required for such checkpoints unless ``int8``).
        int8: ``path`` is an int8 artifact.
        compile: compile for the CPU (faster; the first call of each input shape compiles).

    Returns:
        the network in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a model of the requested kind, its recorded network cannot be built, or it
            records none and no ``network`` is given.

    Example::

        net = runnable_network("models/model.pt", SAUNet(2, 1, 2))
        int8_net = runnable_network("models/model_int8.pt2", int8=True, compile=True)
    """
    from monai_qsa.quantization import load_quantized
    from monai_qsa.utils.compile import compile_for_cpu

    model = load_quantized(path) if int8 else load_checkpoint(_network_for(path, network), path)
    return compile_for_cpu(model, freezing=int8) if compile else model


def _network_for(checkpoint: str | os.PathLike, network: nn.Module | None) -> nn.Module:
    """The network recorded in ``checkpoint``, else ``network``; says so when the two differ."""
    recorded = recorded_network_definition(checkpoint)
    if not recorded:
        if network is None:
            raise ValueError(
                f"the fp32 checkpoint {checkpoint} records no network definition: pass the network it belongs to "
                "(network=, or the bundle's network_def)."
            )
        return network
    configured = network_definition(network) if network is not None else recorded
    differences = {
        key: recorded.get(key) for key in set(recorded) | set(configured) if recorded.get(key) != configured.get(key)
    }
    if differences:
        logger.info(
            "%s records the network it was trained with, which differs from the configured one in %s: using the "
            "recorded network.",
            checkpoint,
            ", ".join(f"{key}={value}" for key, value in sorted(differences.items())),
        )
    return build_network(recorded, checkpoint)


def _read_checkpoint(checkpoint: Path) -> dict:
    """The dictionary a checkpoint holds, read with ``weights_only`` (tensors and plain containers only)."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist.")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{checkpoint} is not a readable checkpoint: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state_dict.")
    return state


def _plain(value: object) -> object:
    """``value`` with tuples as lists, as a JSON config states it."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
