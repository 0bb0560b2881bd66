"""MONAI transforms adapted where the bundles meet other tools."""

from .spacing import Spacingd

__all__ = ["Spacingd"]
