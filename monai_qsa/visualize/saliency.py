"""MONAI's GradCAM, GradCAM++ and occlusion sensitivity of a prediction, for comparison with attention.

For segmentation the explained score is the one pytorch-grad-cam's segmentation target uses: for each target class,
the sum of its logits over the region the network predicts as that class (so a map shows what supports the
predicted structure, not the class's evidence over the whole image, which background dominates).
Every map is normalised per case: GradCAM(++) by its maximum (0 = no evidence, 1 = the strongest evidence in this
case), occlusion by its largest absolute value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from torch import nn

from monai_qsa.visualize.attention import attention_layers, upsample_to_grid

__all__ = ["SALIENCY_METHODS", "ClassScore", "predicted_region", "gradcam_layer", "saliency_maps"]

SALIENCY_METHODS = ("gradcam", "gradcampp", "occlusion")


def predicted_region(logits: torch.Tensor) -> torch.Tensor:
    """One-hot ``(B, C, *S)`` mask of the class each position is predicted as (argmax of ``(B, C, *S)`` logits)."""
    return F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(logits.dtype)


class ClassScore(nn.Module):
    """Turns a network's output into one score per class, ``(B, C)``, for saliency methods to explain.

    Segmentation logits ``(B, C, *S)``: each class's logits summed over ``region`` (``(B or 1, C, *S)``, usually
    :func:`predicted_region` of the unperturbed image, kept fixed while occlusion perturbs it), divided by the
    number of positions. The divisor is the same for every class and case, so the maps are those of the sum (each
    is normalised per case) while GradCAM++, which exponentiates the score, cannot overflow. Classification logits
    ``(B, C)`` pass through.

    Args:
        network: the network.
        region: the per-class region to sum segmentation logits over; required for segmentation networks.
    """

    def __init__(self, network: nn.Module, region: torch.Tensor | None = None) -> None:
        super().__init__()
        self.network = network
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if out.ndim == 2:
            return out
        if self.region is None:
            raise ValueError("ClassScore needs the predicted region to score a segmentation network's output.")
        return (out * self.region).flatten(2).mean(-1)


def gradcam_layer(network: nn.Module) -> str:
    """The module whose activations GradCAM weighs: the last decoder block (SAUNet: full resolution, where the skip
    connections have brought back where things are; coarser blocks, whose channel weights are averaged over the
    whole image, were measured to highlight the lesion less reliably), else the SA unit holding the last SASA
    layer (SAResNet)."""
    decoder = getattr(network, "decoder", None)
    if isinstance(decoder, nn.ModuleList) and len(decoder) > 0:
        return f"decoder.{len(decoder) - 1}"
    layers = list(attention_layers(network))
    if not layers:
        raise ValueError(f"{type(network).__name__} has no decoder and no StandAloneSelfAttention layer for GradCAM.")
    return layers[-1].rsplit(".", 1)[0]


def _target_classes(logits: torch.Tensor) -> list[int]:
    """The foreground classes ``1 .. C-1`` of segmentation logits, the predicted class of classification logits."""
    if logits.ndim > 2:
        return list(range(1, logits.shape[1]))
    if logits.shape[0] != 1:
        raise ValueError(f"name the class to explain for a batch of {logits.shape[0]} classifications.")
    return [int(logits.argmax(1))]


def _per_case(values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``values / reduce(values of the case)`` for each case of the batch; a case whose scale is 0 stays 0."""
    scale = reduce(values.flatten(1).detach()).reshape((-1,) + (1,) * (values.ndim - 1))
    return torch.where(scale > 0, values / scale.clamp_min(1e-12), torch.zeros_like(values))


def _cam(method: str, scorer: ClassScore, image: torch.Tensor, layer: str, classes: list[int]) -> torch.Tensor:
    """GradCAM or GradCAM++ ``(1, 1, *S)`` of one case (MONAI's GradCAM++ mixes up the cases of a batch)."""
    cam_type = GradCAM if method == "gradcam" else GradCAMpp
    cam = cam_type(
        nn_module=scorer,
        target_layers=f"network.{layer}",
        upsampler=lambda size: lambda values: upsample_to_grid(values, size),
        postprocessing=lambda values: _per_case(values, lambda flat: flat.amax(1)),
    )
    return cam(image, class_idx=classes).detach()


def _occlusion(scorer: ClassScore, image: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The fall of the score of one case when a region around each position is hidden, ``(1, 1, *S)``."""
    mask = [max(2, math.ceil(s / 4)) for s in image.shape[2:]]
    occlusion = OcclusionSensitivity(
        nn_module=scorer, mask_size=mask, n_batch=8, overlap=0.5, mode="gaussian", activate=False, verbose=False
    )
    with torch.no_grad():
        hidden, _ = occlusion(image)  # (1, classes, *S): the scores with the region around each position hidden
        score = scorer(image)[:, classes].sum(1).reshape((-1,) + (1,) * (image.ndim - 1))
        drop = score - hidden.as_tensor()[:, classes].sum(1, keepdim=True)
    return _per_case(drop, lambda flat: flat.abs().amax(1))


def saliency_maps(
    network: nn.Module,
    image: torch.Tensor,
    classes: int | Sequence[int] | None = None,
    methods: Sequence[str] = ("gradcam",),
    target_layer: str | None = None,
) -> dict[str, torch.Tensor]:
    """Saliency of ``classes`` for ``image`` by each of ``methods``, each ``(B, 1, *S)`` on the image's grid.

    Args:
        network: the fp32 network.
        image: network input ``(B, C, *S)``; each case is explained on its own.
        classes: the class(es) whose score is explained; default: every foreground class ``1 .. C-1`` of a
            segmentation (their logits summed over the region predicted as each), the predicted class of a
            classification (batch of 1).
        methods: any of :data:`SALIENCY_METHODS`; occlusion runs about ``4^d`` forward passes.
        target_layer: module name (in ``network``) whose activations GradCAM/GradCAM++ weigh; default
            :func:`gradcam_layer`.

    Example::

        >>> net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3).eval()
        >>> saliency_maps(net, torch.rand(1, 1, 32, 32))["gradcam"].shape  # the foreground class 1
        torch.Size([1, 1, 32, 32])
    """
    unknown = set(methods) - set(SALIENCY_METHODS)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)}; choose from {SALIENCY_METHODS}.")
    with torch.no_grad():
        logits = network(image)
    if classes is None:
        classes = _target_classes(logits)
    classes = [int(classes)] if isinstance(classes, int) else [int(c) for c in classes]
    if not classes or not all(0 <= c < logits.shape[1] for c in classes):
        raise ValueError(f"classes must be indices of the {logits.shape[1]} output channels, got {classes}.")
    region = predicted_region(logits) if logits.ndim > 2 else None
    layer = target_layer or gradcam_layer(network)
    maps = {}
    for method in methods:
        per_case = []
        for case in range(image.shape[0]):
            scorer = ClassScore(network, None if region is None else region[case : case + 1]).eval()
            one = image[case : case + 1]
            if method == "occlusion":
                per_case.append(_occlusion(scorer, one, classes))
            else:
                per_case.append(_cam(method, scorer, one, layer, classes))
        maps[method] = torch.cat(per_case)
    return maps
