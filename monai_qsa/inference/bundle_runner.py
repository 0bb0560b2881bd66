"""Run one case at a time through a bundle's own inference pipeline (preprocessing, network, inferer,
postprocessing), leaving the writing of outputs to the caller."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, SaveImaged

from monai_qsa.data.datalist import image_shape

__all__ = ["BundleRunner", "CaseError"]


class CaseError(ValueError):
    """A case that cannot be processed; the message is the per-file reason reported to the user."""


@dataclass
class CaseResult:
    """Postprocessed prediction of one case: a MetaTensor (segmentation, in the input's geometry) or class
    probabilities."""

    pred: torch.Tensor
    seconds: float


class BundleRunner:
    """A bundle's ``configs/inference.json`` pipeline, case by case.

    Args:
        bundle_dir: the bundle folder (``configs/inference.json`` and ``configs/metadata.json``, trained ``models/``).
        int8: run the int8 artifact ``models/model_int8.pt2`` instead of ``models/model.pt``.
        device: torch device for the network (int8 models run on the CPU).
    """

    def __init__(self, bundle_dir: str | os.PathLike, int8: bool = False, device: str = "cpu") -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        config, meta = self.bundle_dir / "configs" / "inference.json", self.bundle_dir / "configs" / "metadata.json"
        if not config.is_file() or not meta.is_file():
            raise FileNotFoundError(f"{self.bundle_dir} is not a bundle: it needs configs/inference.json and configs/metadata.json.")
        parser = ConfigParser()
        parser.read_config(str(config))
        parser.read_meta(str(meta))
        parser.update({"bundle_root": str(self.bundle_dir), "use_int8": int8, "device": f"$torch.device('{device}')"})
        self.metadata = json.loads(meta.read_text())
        self.device = torch.device(device)
        self.spatial_dims = int(parser.get_parsed_content("network_def#spatial_dims"))
        self.is_segmentation = self.metadata["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.network = parser.get_parsed_content("network").to(self.device).eval()
        postprocessing = parser.get_parsed_content("postprocessing")
        # outputs are written by the caller (temporary name, then rename), not by the bundle's SaveImaged
        self.postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveImaged)])
        self.labels = self.metadata["network_data_format"]["outputs"]["pred"].get("channel_def", {})

    def check_header(self, path: Path) -> None:
        """Refuse, before loading, files whose dimensionality the bundle's network cannot take."""
        try:
            shape = image_shape(path)
        except Exception as error:
            raise CaseError(f"unreadable image header: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
        spatial = [s for s in shape if s != 1] if len(shape) > self.spatial_dims else list(shape)
        if len(spatial) != self.spatial_dims:
            raise CaseError(f"wrong dimensionality: shape {tuple(shape)} is not a {self.spatial_dims}D image for this {self.spatial_dims}D bundle")
        if 0 in shape:
            raise CaseError(f"empty image: shape {tuple(shape)}")

    def preprocess(self, path: Path) -> dict:
        """The bundle's preprocessing of one file; :class:`CaseError` with the reason when it is bad input."""
        self.check_header(path)
        try:
            data = self.preprocessing({"image": str(path)})
        except Exception as error:
            raise CaseError(f"cannot load/preprocess: {type(error).__name__}: {_first_line(error)}") from error
        if not torch.isfinite(data["image"]).any():
            raise CaseError("image has no finite value (all NaN/inf)")
        return data

    def predict(self, data: dict) -> CaseResult:
        """Inference and postprocessing of one preprocessed case (``data`` gains the ``pred`` entry)."""
        start = time.perf_counter()
        with torch.no_grad():
            data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0].cpu()
        seconds = time.perf_counter() - start
        return CaseResult(pred=self.postprocessing(data)["pred"], seconds=seconds)

    def run(self, path: Path) -> CaseResult:
        """Preprocess, infer and postprocess one file."""
        return self.predict(self.preprocess(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""
