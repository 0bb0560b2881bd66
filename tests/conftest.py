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
    ``models/model.pt`` the way the bundle's training saves it (weights and network definition): enough for inference
    tests that do not depend on training."""

    def make(name: str, parent: Path) -> Path:
        import torch

        from monai_qsa.bundle import bundle_workflow
        from monai_qsa.models import NetworkDefinition

        target = parent / name
        shutil.copytree(
            REPO / "bundles" / name,
            target,
            ignore=shutil.ignore_patterns("models", "logs", "eval", "data", "predictions"),
        )
        torch.manual_seed(0)
        network = bundle_workflow(target).network_def
        (target / "models").mkdir()
        checkpoint = {"model": network.state_dict(), "network_def": NetworkDefinition(network).state_dict()}
        torch.save(checkpoint, target / "models" / "model.pt")
        return target

    return make
