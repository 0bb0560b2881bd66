from .check import QuantizationFailedError, QuantizationReport, quantize_and_check
from .int8_attention import quantize_attention_int8
from .int8_conv3d import quantize_conv3d_int8
from .ptq import BACKENDS, quantize_ptq
from .serialization import load_quantized, save_quantized

__all__ = [
    "BACKENDS",
    "quantize_ptq",
    "quantize_attention_int8",
    "quantize_conv3d_int8",
    "save_quantized",
    "load_quantized",
    "quantize_and_check",
    "QuantizationReport",
    "QuantizationFailedError",
]
