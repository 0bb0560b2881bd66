from .energy import EnergyHandler
from .quantization import PostTrainingQuantizationHandler

__all__ = ["EnergyHandler", "PostTrainingQuantizationHandler"]
