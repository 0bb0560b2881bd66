"""Where monai_qsa caches what it computes once per machine (compiled kernels, label values of datasets)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$MONAI_QSA_CACHE_DIR``, default ``~/.cache/monai_qsa``."""
    return Path(os.environ.get("MONAI_QSA_CACHE_DIR", Path.home() / ".cache" / "monai_qsa"))
