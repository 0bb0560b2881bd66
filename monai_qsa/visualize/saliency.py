"""MONAI's GradCAM, GradCAM++ and occlusion sensitivity for the same prediction, for comparison with attention."""

from __future__ import annotations

import math

import torch
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from torch import nn

__all__ = ["SALIENCY_METHODS", "ClassScore", "saliency_maps"]

SALIENCY_METHODS = ("gradcam", "gradcampp", "occlusion")


class ClassScore(nn.Module):
    """Turns a network's output into one score per class, ``(B, C)``: segmentation logits are averaged over
    space (the evidence for a class over the whole image), classification logits pass through."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out.flatten(2).mean(-1) if out.ndim > 2 else out


def saliency_maps(network: nn.Module, image: torch.Tensor, target_layer: str, class_index: int, methods: tuple[str, ...] = ("gradcam",)) -> dict[str, torch.Tensor]:
    """Saliency of ``class_index`` for ``image`` by each of ``methods``, each ``(B, 1, *S)`` at the image's size.

    Args:
        network: the fp32 network.
        image: network input ``(B, C, *S)``.
        target_layer: module name (in ``network``) whose activations GradCAM/GradCAM++ weigh.
        class_index: the class whose evidence is mapped (e.g. the foreground class of a segmentation).
        methods: any of :data:`SALIENCY_METHODS`; occlusion runs about ``4^d`` forward passes.
    """
    unknown = set(methods) - set(SALIENCY_METHODS)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)}; choose from {SALIENCY_METHODS}.")
    scorer = ClassScore(network).eval()
    maps = {}
    for method in methods:
        if method in ("gradcam", "gradcampp"):
            cam = (GradCAM if method == "gradcam" else GradCAMpp)(nn_module=scorer, target_layers=f"network.{target_layer}")
            maps[method] = cam(image, class_idx=class_index).detach()
        else:
            mask = [max(2, math.ceil(s / 4)) for s in image.shape[2:]]
            occlusion = OcclusionSensitivity(nn_module=scorer, mask_size=mask, n_batch=8, overlap=0.5, mode="gaussian", activate=False, verbose=False)
            with torch.no_grad():
                sensitivity, _ = occlusion(image)
            # (B, C, *S): score with the region hidden; the fall of the class score is its importance
            maps[method] = (scorer(image)[:, class_index].reshape((-1, 1) + (1,) * (image.ndim - 2)) - sensitivity[:, class_index : class_index + 1]).detach()
    return maps
