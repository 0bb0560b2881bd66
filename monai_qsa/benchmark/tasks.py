"""What the benchmark compares for each task: the bundle that defines data, transforms, optimiser and SA network,
and the MONAI CNN that replaces the SA network as the baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from monai_qsa.bundle import bundle_dir

__all__ = ["BenchmarkTask", "BENCHMARK_TASKS", "BASELINES", "default_bundle_dir", "cnn_network_def"]

BASELINES = ("matched", "standard")


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark task.

    Args:
        name: ``cls``, ``seg2d`` or ``seg3d``.
        bundle: the bundle (folder name under ``bundles/``) whose ``train.json`` trains both models.
        epochs: default training epochs (fits the 20-minute budget of a task on 2 cores).
        metric: name of the task metric in the report.
    """

    name: str
    bundle: str
    epochs: int
    metric: str


BENCHMARK_TASKS = {
    "cls": BenchmarkTask("cls", "sa_cls", epochs=15, metric="accuracy"),
    "seg2d": BenchmarkTask("seg2d", "sa_seg", epochs=12, metric="Dice"),
    "seg3d": BenchmarkTask("seg3d", "sa_seg3d", epochs=10, metric="Dice"),
}


def default_bundle_dir(task: BenchmarkTask) -> Path:
    """The shipped bundle for ``task`` (:func:`monai_qsa.bundle.bundle_dir`: a source checkout or an installed
    package).

    Raises:
        FileNotFoundError: the bundle is not installed.
    """
    return bundle_dir(task.bundle)


def sa_network_def(bundle_dir: Path) -> dict:
    """The SA network definition of the bundle's ``train.json``."""
    return json.loads((bundle_dir / "configs" / "train.json").read_text())["network_def"]


def cnn_network_def(sa_def: dict, baseline: str = "matched") -> dict:
    """The MONAI CNN that stands in for the SA network ``sa_def`` (a bundle ``network_def``).

    Args:
        sa_def: ``SAUNet`` or ``SAResNet`` config.
        baseline: ``"matched"``: the same widths and depth built from convolutions (MONAI ``UNet`` with the SAUNet's
            ``features`` as channels and two residual units per level; MONAI ``ResNet`` with basic blocks and the
            SAResNet's ``layers`` and ``block_inplanes``), so the comparison isolates convolution vs attention, as
            in the paper. ``"standard"``: MONAI's stock networks, ``BasicUNet`` (default features) and ``resnet18``.

    Raises:
        ValueError: unknown ``baseline`` or network.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}.")
    target = sa_def["_target_"].rsplit(".", 1)[-1]
    dims = sa_def["spatial_dims"]
    if target == "SAUNet":
        io = {"spatial_dims": dims, "in_channels": sa_def["in_channels"], "out_channels": sa_def["out_channels"]}
        if baseline == "standard":
            return {"_target_": "monai.networks.nets.BasicUNet", **io}
        features = list(sa_def["features"])
        return {
            "_target_": "monai.networks.nets.UNet",
            **io,
            "channels": features,
            "strides": [2] * (len(features) - 1),
            "num_res_units": 2,
        }
    if target == "SAResNet":
        io = {"spatial_dims": dims, "n_input_channels": sa_def["in_channels"], "num_classes": sa_def["num_classes"]}
        if baseline == "standard":
            return {"_target_": "monai.networks.nets.resnet18", **io}
        return {
            "_target_": "monai.networks.nets.ResNet",
            "block": "basic",
            "layers": list(sa_def["layers"]),
            "block_inplanes": list(sa_def["block_inplanes"]),
            **io,
        }
    raise ValueError(f"no CNN baseline is defined for {sa_def['_target_']}.")
