"""monai_qsa: stand-alone self-attention networks for MONAI, quantised to int8 for CPUs."""

__version__ = "0.1.0"
