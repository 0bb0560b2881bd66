import os
import warnings
from pathlib import Path

import pytest

# compiled kernels are cached inside the test tree, never in a shared/global location
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent / ".inductor_cache"))
warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*is deprecated.*")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
