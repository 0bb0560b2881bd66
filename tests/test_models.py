"""monai_qsa.models (checkpoint or int8 file -> runnable network) and the bundle helpers that call it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_qsa.bundle import ConfigValueError, as_bool, inference_network
from monai_qsa.models import (
    NetworkDefinition,
    build_network,
    load_checkpoint,
    network_definition,
    recorded_network_definition,
    runnable_network,
)
from monai_qsa.networks import SAResNet, SAUNet
from monai_qsa.quantization import quantize_ptq, save_quantized
from monai_qsa.utils.compile import CompiledForCPU, has_cpp_compiler

REPO = Path(__file__).resolve().parents[1]


def _net(seed: int) -> SAUNet:
    torch.manual_seed(seed)
    return SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3)


@pytest.mark.parametrize("layout", ["state_dict", "checkpoint_saver"])
def test_load_checkpoint_both_layouts(tmp_path, layout):
    trained, image = _net(1), torch.randn(1, 1, 16, 16)
    saved = (
        trained.state_dict() if layout == "state_dict" else {"network": trained.state_dict(), "epoch": torch.tensor(3)}
    )
    torch.save(saved, tmp_path / "model.pt")
    network = load_checkpoint(_net(2).train(), tmp_path / "model.pt")
    assert not network.training
    with torch.no_grad():
        torch.testing.assert_close(network(image), trained.eval()(image))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(_net(0), tmp_path / "missing.pt")
    torch.save({"network": {"weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt holds no state_dict of SAUNet"):
        load_checkpoint(_net(0), tmp_path / "other.pt")
    torch.save(_net(0), tmp_path / "pickled_module.pt")  # a whole pickled module: loading would run its code
    with pytest.raises(ValueError, match="pickled_module.pt is not a readable checkpoint"):
        load_checkpoint(_net(0), tmp_path / "pickled_module.pt")


def test_runnable_network_fp32_and_int8(tmp_path):
    trained, image = _net(1).eval(), torch.rand(2, 1, 16, 16)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    qmodel = quantize_ptq(trained, [torch.rand(4, 1, 16, 16) for _ in range(2)], image)
    save_quantized(tmp_path / "model_int8.pt2", qmodel, image)

    with torch.no_grad():
        fp32 = runnable_network(tmp_path / "model.pt", _net(2))
        torch.testing.assert_close(fp32(image), trained(image))
        int8 = runnable_network(tmp_path / "model_int8.pt2", int8=True)
        torch.testing.assert_close(int8(image), qmodel(image))
    with pytest.raises(ValueError, match="records no network definition"):
        runnable_network(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt.*monai_qsa int8 model"):
        runnable_network(tmp_path / "model.pt", int8=True)
    if has_cpp_compiler():
        assert isinstance(runnable_network(tmp_path / "model.pt", _net(2), compile=True), CompiledForCPU)

    # the bundle helper reads the flags as users type them, and names the missing file
    assert inference_network(_net(2), tmp_path, int8="TRUE", compile="false").monai_qsa_backend == "x86_inductor"
    with pytest.raises(FileNotFoundError, match="model.pt does not exist"):
        inference_network(_net(2), tmp_path / "empty", int8="0")


def test_as_bool_accepts_what_users_type():
    for value, expected in ((True, True), ("true", True), ("False", False), (" TRUE ", True), ("1", True), (0, False)):
        assert as_bool(value, "resume") is expected
    for value in ("maybe", "", None, 2, 1.5):
        with pytest.raises(ConfigValueError, match="--resume must be true or false"):
            as_bool(value, "resume")


def test_bad_flag_on_the_bundle_command_line_is_one_line(tmp_path):
    from monai_qsa.data import make_synthetic_dataset

    make_synthetic_dataset("seg2d", tmp_path / "data", num_cases=(1, 0, 1))
    config = REPO / "bundles" / "sa_seg" / "configs" / "inference.json"
    arguments = [
        "--bundle_root",
        tmp_path,
        "--input_dir",
        tmp_path / "data" / "imagesTs",
        "--output_dir",
        tmp_path / "out",
    ]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, *arguments, "--use_int8", "maybe"]
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --use_int8 must be true or false (or 1/0), got 'maybe'."


def _classifier(block_inplanes: tuple[int, ...]) -> SAResNet:
    return SAResNet(2, 1, 3, layers=[1, 1], block_inplanes=block_inplanes, num_heads=2, kernel_size=3, stem_features=8)


def test_network_definition_rebuilds_the_network():
    network = _classifier((8, 16))
    definition = network_definition(network)
    assert definition == {
        "_target_": "monai_qsa.networks.nets.sa_resnet.SAResNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "num_classes": 3,
        "layers": [1, 1],
        "block_inplanes": [8, 16],
        "kernel_size": 3,
        "num_heads": 2,
        "stem_features": 8,
    }
    rebuilt = build_network(definition)
    assert type(rebuilt) is SAResNet
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in network.state_dict().items()
    }
    assert network_definition(torch.nn.Linear(2, 2)) == {}  # networks that record nothing


def test_checkpoint_carries_the_network_it_was_trained_with(tmp_path):
    """A model trained with a --network_def override is served as trained, whatever network the config states."""
    trained, image = _classifier((8, 16)).eval(), torch.randn(2, 1, 32, 32)
    checkpoint = {"network": trained.state_dict(), "network_def": NetworkDefinition(trained).state_dict()}
    torch.save(checkpoint, tmp_path / "model.pt")
    assert recorded_network_definition(tmp_path / "model.pt") == network_definition(trained)
    configured = _classifier((16, 32))  # what inference.json states: a different network
    with torch.no_grad():
        served = runnable_network(tmp_path / "model.pt", configured)
        torch.testing.assert_close(served(image), trained(image))
        torch.testing.assert_close(runnable_network(tmp_path / "model.pt")(image), trained(image))


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "torch.nn.Linear",
        "monai.networks.nets.UNet",
        "monai_qsa.networks.nets.sa_resnet.torch.nn.Linear",  # reached through a module attribute
        "monai_qsa.networks.nets.sa_resnet.SABottleneck.forward",
        "monai_qsa.networks.nets.nothing_here",
    ],
)
def test_recorded_definitions_name_only_our_networks(tmp_path, target):
    torch.save({"network": {}, "network_def": {"_target_": target, "in_features": 2}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=f"model.pt: the recorded network '{target}' is not a network class"):
        runnable_network(tmp_path / "model.pt", _net(0))


def test_recorded_definition_with_bad_arguments_names_the_file(tmp_path):
    definition = {**network_definition(_classifier((8, 16))), "block_inplanes": [8, 15], "$evil": "os.system('x')"}
    torch.save({"network": {}, "network_def": definition}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt: cannot build the recorded network .*SAResNet"):
        runnable_network(tmp_path / "model.pt")
