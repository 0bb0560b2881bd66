"""MONAI transforms adapted where the bundles meet other tools."""

from .orientation import Orientation, Orientationd
from .spacing import Spacingd

__all__ = ["Orientation", "Orientationd", "Spacingd"]
