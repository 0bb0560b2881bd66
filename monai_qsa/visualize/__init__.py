from .attention import (
    ATTENTION_STATISTICS,
    attention_layers,
    attention_maps,
    attention_statistics,
    default_layers,
    upsample_to_grid,
)
from .explain import explain, explain_case, save_overlay
from .saliency import SALIENCY_METHODS, ClassScore, gradcam_layer, predicted_region, saliency_maps

__all__ = [
    "ATTENTION_STATISTICS",
    "SALIENCY_METHODS",
    "ClassScore",
    "attention_layers",
    "attention_maps",
    "attention_statistics",
    "default_layers",
    "explain",
    "explain_case",
    "gradcam_layer",
    "predicted_region",
    "save_overlay",
    "saliency_maps",
    "upsample_to_grid",
]
