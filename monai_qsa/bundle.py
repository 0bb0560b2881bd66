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

__all__ = [
    "find_bundle_root",
    "as_bool",
    "ConfigValueError",
    "latest_checkpoint",
    "stacked_pred_label",
    "inference_network",
    "output_channels",
]


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


class ConfigValueError(SystemExit):
    """A bad value of a bundle config argument. It is a ``SystemExit``, so that ``python -m monai.bundle run`` stops
    with this one-line message instead of a traceback through MONAI's config evaluation; catch it as
    ``SystemExit`` (its ``code`` is the message) when calling the helpers of this module from Python."""


_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def as_bool(value: object, name: str) -> bool:
    """A boolean config value as users write it: ``True``/``False`` (what ``--resume True`` gives), or ``true``,
    ``false``, ``1``, ``0`` in any case (what ``--resume false`` gives: a string, which would
    otherwise count as true).

    Raises:
        ConfigValueError: anything else, naming the argument.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ConfigValueError(f"error: --{name} must be true or false (or 1/0), got {value!r}.")


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_epoch=*.pt") -> str:
    """The newest training checkpoint in ``ckpt_dir`` (to resume from).

    Raises:
        FileNotFoundError: there is none, naming the folder.
    """
    candidates = sorted(Path(ckpt_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"resume was requested but {ckpt_dir} holds no {pattern} checkpoint.")
    return str(candidates[-1])


def stacked_pred_label(
    pred_key: str = "pred", label_key: str = "label", label_to_index: bool = False
) -> Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]]:
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
    network_def: nn.Module,
    model_dir: str | os.PathLike,
    int8: object = False,
    compile: object = False,
    fp32_name: str = "model.pt",
    int8_name: str = "model_int8.pt2",
) -> nn.Module:
    """The network an inference config runs (:func:`monai_qsa.models.runnable_network`): ``network_def`` with the
    trained fp32 weights of ``model_dir/fp32_name``, or the int8 artifact ``model_dir/int8_name``; optionally
    compiled for the CPU. ``int8`` and ``compile`` are read with :func:`as_bool` (``--use_int8``, ``--compile``).

    Raises:
        FileNotFoundError: the requested model file does not exist (train first, or quantise for ``int8``).
        ConfigValueError: ``int8`` or ``compile`` is not a boolean.
    """
    from monai_qsa.models import runnable_network

    int8, compile = as_bool(int8, "use_int8"), as_bool(compile, "compile")
    path = Path(model_dir) / (int8_name if int8 else fp32_name)
    if not path.is_file():
        raise FileNotFoundError(f"{'int8' if int8 else 'fp32'} model {path} does not exist: run train.json first.")
    return runnable_network(path, network_def, int8=int8, compile=compile)
