from .ptq import BACKENDS, quantize_ptq
from .serialization import load_quantized, save_quantized

__all__ = ["BACKENDS", "quantize_ptq", "save_quantized", "load_quantized"]
