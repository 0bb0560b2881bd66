from .attention import ATTENTION_STATISTICS, attention_layers, attention_maps, attention_statistics, default_layers
from .explain import explain, explain_case, save_overlay
from .saliency import SALIENCY_METHODS, ClassScore, saliency_maps

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
    "save_overlay",
    "saliency_maps",
]
