"""Small helpers the bundle configs call: where the bundle lives, which checkpoint to resume from, the names of
the output channels, and metric inputs for decollated classification outputs."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = [
    "bundles_dir",
    "bundle_dir",
    "bundle_root_of",
    "bundle_workflow",
    "find_bundle_root",
    "as_bool",
    "ConfigValueError",
    "latest_checkpoint",
    "stacked_pred_label",
    "inference_network",
    "output_channels",
]


BUNDLES_ENV = "MONAI_QSA_BUNDLES"
"""Environment variable naming a folder of bundles that takes precedence over the shipped ones."""


def bundles_dir() -> Path:
    """The folder holding the bundles that ship with monai_qsa (``sa_seg``, ``sa_seg3d``, ``sa_cls``).

    Looked up in this order: ``$MONAI_QSA_BUNDLES``; ``bundles/`` beside the package (a source checkout or an
    editable install); ``<prefix>/share/monai_qsa/bundles`` (where ``pip install`` puts them from a wheel).

    Raises:
        FileNotFoundError: none of these exists, naming the places looked at.
    """
    candidates = [Path(os.environ[BUNDLES_ENV])] if os.environ.get(BUNDLES_ENV) else []
    candidates.append(Path(__file__).resolve().parents[1] / "bundles")  # source checkout, editable install
    candidates.append(Path(sys.prefix) / "share" / "monai_qsa" / "bundles")  # installed from a wheel
    for candidate in candidates:
        if (candidate / "sa_seg" / "configs").is_dir():
            return candidate
    raise FileNotFoundError(
        f"cannot find the monai_qsa bundles: looked in {', '.join(map(str, candidates))}; set ${BUNDLES_ENV}."
    )


def bundle_dir(name: str) -> Path:
    """The folder of the shipped bundle ``name`` (see :func:`bundles_dir`).

    Raises:
        FileNotFoundError: there is no such bundle, naming the ones there are.
    """
    root = bundles_dir()
    path = root / name
    if not (path / "configs" / "metadata.json").is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "configs" / "metadata.json").is_file())
        raise FileNotFoundError(f"no bundle {name!r} in {root}; there are: {', '.join(known)}.")
    return path


def bundle_root_of(config_file: str | os.PathLike) -> Path:
    """The bundle folder of a config file, as ``ConfigWorkflow`` derives it: the parent of ``configs/``, otherwise
    the config file's own folder."""
    configs = Path(config_file).resolve().parent
    return configs.parent if configs.name == "configs" else configs


def bundle_workflow(
    bundle_root: str | os.PathLike, config: str = "inference.json", workflow_type: str = "infer", **override
) -> ConfigWorkflow:
    """MONAI's ``ConfigWorkflow`` for a bundle config, initialised, with ``bundle_root`` passed in: its properties
    (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``, ...) are the bundle's own.

    The bundle's ``logging.conf`` is not applied (the caller's logging stays as it is).

    Args:
        bundle_root: the bundle folder.
        config: config file name(s) under ``configs/`` (several merge in order, as ``--config_file`` lists do).
        workflow_type: ``"infer"`` or ``"train"``.
        override: config values to set, as ``--key value`` on the command line.
    """
    from monai.bundle import ConfigWorkflow

    configs = Path(bundle_root) / "configs"
    names = [config] if isinstance(config, str) else list(config)
    # logging_file=False makes MONAI log that it skips logging: not news to the caller
    quiet = _Without("Logging file is set to False")
    workflow_logger = logging.getLogger("monai.bundle.workflows")
    workflow_logger.addFilter(quiet)
    try:
        workflow = ConfigWorkflow(
            config_file=[str(configs / name) for name in names],
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            bundle_root=str(bundle_root),
            **override,
        )
    finally:
        workflow_logger.removeFilter(quiet)
    workflow.initialize()
    return workflow


class _Without(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def find_bundle_root(argv: Sequence[str] | None = None) -> str:
    """The bundle root a config uses when none is passed (``--bundle_root`` always wins, it overrides this
    expression), so outputs land in the bundle whatever the current directory.

    Derived from the config file path as ``ConfigWorkflow`` does (:func:`bundle_root_of`): the first
    ``--config_file`` of the ``python -m monai.bundle run`` command line (``bundles/sa_seg/configs/train.json``
    gives ``bundles/sa_seg``; a list such as ``"['configs/train.json','configs/multi_gpu_train.json']"`` its first
    file); otherwise the current directory if it is a bundle (has ``configs/metadata.json``).

    Args:
        argv: the command line to read; defaults to ``sys.argv``.

    Raises:
        ValueError: neither applies; pass ``bundle_root`` (``--bundle_root``, ``ConfigWorkflow(bundle_root=...)``).
    """
    argv = list(sys.argv if argv is None else argv)
    for position, argument in enumerate(argv):
        value = None
        if argument == "--config_file" and position + 1 < len(argv):
            value = argv[position + 1]
        elif argument.startswith("--config_file="):
            value = argument.split("=", 1)[1]
        if value:
            first = re.split(r"[,\[\]'\"\s]+", value.strip())
            first = next((part for part in first if part), None)
            if first:
                return str(bundle_root_of(first))
    if Path("configs/metadata.json").is_file():
        return os.getcwd()
    raise ValueError(
        "cannot tell the bundle root: run the config with python -m monai.bundle run --config_file ... or pass "
        "--bundle_root (bundle_root= from Python)."
    )


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
