"""Networks that remember the arguments they were built with, so a trained model can carry its definition."""

from __future__ import annotations

import functools
import inspect
from typing import TypeVar

from torch import nn

__all__ = ["records_arguments"]

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])


def records_arguments(cls: ModuleType) -> ModuleType:
    """Class decorator: every instance keeps the constructor arguments it was given (defaults left out) in
    ``arguments``, e.g. ``{"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [8, 16]}``: with the
    class name, the ``network_def`` of a bundle config that rebuilds it (see
    :func:`monai_qsa.models.network_definition`)."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: nn.Module, *args, **kwargs) -> None:
        given = signature.bind(self, *args, **kwargs).arguments
        init(self, *args, **kwargs)
        self.arguments = {name: value for name, value in given.items() if name != "self"}

    cls.__init__ = __init__
    return cls
