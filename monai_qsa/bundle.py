"""Small helpers the bundle configs call: where the bundle lives, which checkpoint to resume from, the names of
the output channels, and metric inputs for decollated classification outputs."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["find_bundle_root", "flag", "latest_checkpoint", "stacked_pred_label", "inference_network", "output_channels"]


def find_bundle_root() -> str:
    """The folder of the bundle whose config is being run, so outputs land there whatever the current directory.

    Looks for the ``ConfigWorkflow`` evaluating the config (``python -m monai.bundle run --config_file
    bundles/sa_seg/configs/train.json`` gives ``bundles/sa_seg``); otherwise the current directory if it is a
    bundle (has ``configs/metadata.json``). Override with ``--bundle_root`` (MONAI Label does).

    Raises:
        ValueError: neither applies.
    """
    from monai.bundle import ConfigWorkflow

    for frame_info in inspect.stack(context=0):
        owner = frame_info.frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow) and hasattr(owner, "config_root_path"):
            configs = Path(owner.config_root_path).resolve()
            return str(configs.parent if configs.name == "configs" else configs)
    if Path("configs/metadata.json").is_file():
        return os.getcwd()
    raise ValueError("cannot tell the bundle root: run the config through monai.bundle or pass --bundle_root.")


def output_channels(bundle_root: str | os.PathLike) -> dict[int, str]:
    """``{channel: name}`` of the network output, from ``network_data_format`` in the bundle's
    ``configs/metadata.json`` (the label names MONAI Label shows, stored with the int8 model).

    Raises:
        ValueError: the metadata has no output ``channel_def``, naming the file.
    """
    path = Path(bundle_root) / "configs" / "metadata.json"
    outputs = json.loads(path.read_text())["network_data_format"]["outputs"]
    channel_def = next(iter(outputs.values()), {}).get("channel_def")
    if not channel_def:
        raise ValueError(f"{path}: network_data_format.outputs has no channel_def naming the output channels.")
    return {int(channel): name for channel, name in channel_def.items()}


def flag(value: object, name: str) -> bool:
    """A boolean config value, refusing strings: ``python -m monai.bundle run --resume false`` passes the string
    ``"false"`` (truthy); on the command line booleans are written ``True`` / ``False``.

    Raises:
        ValueError: ``value`` is not a bool, naming the argument.
    """
    if not isinstance(value, bool):
        raise ValueError(f"--{name} must be True or False (capitalised on the command line), got {value!r}.")
    return value


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_epoch=*.pt") -> str:
    """The newest training checkpoint in ``ckpt_dir`` (to resume from).

    Raises:
        FileNotFoundError: there is none, naming the folder.
    """
    candidates = sorted(Path(ckpt_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"resume was requested but {ckpt_dir} holds no {pattern} checkpoint.")
    return str(candidates[-1])


def stacked_pred_label(pred_key: str = "pred", label_key: str = "label", label_to_index: bool = False) -> Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform for Ignite metrics (e.g. ``Accuracy``) that need batched ``(y_pred, y)`` tensors from a
    MONAI engine's decollated list of per-sample dicts.

    Args:
        pred_key: key of the prediction in each sample.
        label_key: key of the target in each sample.
        label_to_index: turn one-hot targets into class indices (multi-class ``Accuracy`` wants indices).
    """

    def transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        pred = torch.stack([torch.as_tensor(item[pred_key]) for item in output])
        label = torch.stack([torch.as_tensor(item[label_key]) for item in output])
        return pred, label.argmax(-1) if label_to_index else label

    return transform


def inference_network(
    network_def: nn.Module, model_dir: str | os.PathLike, int8: bool = False, compile: bool = False,
    fp32_name: str = "model.pt", int8_name: str = "model_int8.pt2",
) -> nn.Module:
    """The network an inference config runs: ``network_def`` with the trained fp32 weights of
    ``model_dir/fp32_name``, or the int8 artifact ``model_dir/int8_name``; optionally compiled for the CPU.

    Raises:
        FileNotFoundError: the requested model file does not exist (train first, or quantise for ``int8``).
    """
    from monai_qsa.handlers.quantization import load_network_weights
    from monai_qsa.quantization import load_quantized
    from monai_qsa.utils.compile import compile_for_cpu

    int8, compile = flag(int8, "use_int8"), flag(compile, "compile")
    path = Path(model_dir) / (int8_name if int8 else fp32_name)
    if not path.is_file():
        raise FileNotFoundError(f"{'int8' if int8 else 'fp32'} model {path} does not exist: run train.json first.")
    if int8:
        network = load_quantized(path)
    else:
        network = network_def.eval()
        load_network_weights(network, path)
    return compile_for_cpu(network, freezing=int8) if compile else network
