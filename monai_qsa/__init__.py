"""monai_qsa: stand-alone self-attention networks for MONAI, quantised to int8 for CPUs."""

__version__ = "0.1.0"

# subpackages are imported so that bundle configs can write `$import monai_qsa` and then `monai_qsa.data....`
from . import bundle, data, handlers, networks, quantization, transforms, utils

__all__ = ["__version__", "bundle", "data", "handlers", "networks", "quantization", "transforms", "utils"]
