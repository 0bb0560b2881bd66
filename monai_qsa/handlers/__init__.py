from .energy import EnergyHandler

__all__ = ["EnergyHandler"]
