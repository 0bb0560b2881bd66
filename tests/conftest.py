import os
import shutil
import warnings
from pathlib import Path

import pytest

# compiled kernels are cached inside the test tree, never in a shared/global location
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent / ".inductor_cache"))
os.environ.setdefault("MONAI_QSA_CACHE_DIR", str(Path(__file__).resolve().parent / ".monai_qsa_cache"))
warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*is deprecated.*")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def untrained_bundle():
    """Copy a bundle of this repository to a folder and save its network, freshly initialised (seed 0), as
    ``models/model.pt``: enough for inference tests that do not depend on training."""

    def make(name: str, parent: Path) -> Path:
        import torch
        from monai.bundle import ConfigParser

        target = parent / name
        shutil.copytree(
            REPO / "bundles" / name,
            target,
            ignore=shutil.ignore_patterns("models", "logs", "eval", "data", "predictions"),
        )
        parser = ConfigParser()
        parser.read_config(str(target / "configs" / "inference.json"))
        torch.manual_seed(0)
        (target / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), target / "models" / "model.pt")
        return target

    return make
