"""What a user sees on the console: no third-party import notices on the int8 paths, no misleading MONAI warnings
from the 2D pipeline or from the bundle configs."""

import importlib
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.bundle import ComponentLocator
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged
from monai.transforms import Orientationd as MonaiOrientationd

import monai_qsa
from monai_qsa.data import make_synthetic_dataset
from monai_qsa.models import runnable_network
from monai_qsa.quantization import quantize_ptq, save_quantized
from monai_qsa.transforms import Orientationd, Spacingd
from monai_qsa.utils.third_party import quiet_import_noise

REPO = Path(__file__).resolve().parents[1]

#: messages a user must not see on these paths, by kind
NOISE = {
    "torchao extension load failure": r"Failed to load .*torchao",
    "triton": r"Detected no triton",
    "pytree register_constant": r"register_constant\(\)",
    "2D axcodes": r"axcodes \(.*\) length is smaller than number of input spatial dimensions",
    "ambiguous config component": r"more than 1 component have name",
}


def noise_in(text: str) -> dict[str, list[str]]:
    """The lines of ``text`` matching each kind of :data:`NOISE` that occurs."""
    found = {kind: [line for line in text.splitlines() if re.search(pattern, line)] for kind, pattern in NOISE.items()}
    return {kind: lines[:3] for kind, lines in found.items() if lines}


@pytest.fixture
def images_2d(tmp_path) -> list[Path]:
    """Two synthetic 2D NIfTI images with a flipped axis, anisotropic spacing and a z offset in their affine."""
    make_synthetic_dataset("seg2d", tmp_path / "data", seed=1, num_cases=(1, 1, 2))
    return sorted((tmp_path / "data" / "imagesTs").iterdir())


@pytest.fixture
def seg_bundle(untrained_bundle, tmp_path) -> Path:
    """The sa_seg bundle with its untrained fp32 model and that model quantised to int8."""
    bundle = untrained_bundle("sa_seg", tmp_path)
    network = runnable_network(bundle / "models" / "model.pt")
    example = torch.rand(1, 1, 64, 64)
    int8_network = quantize_ptq(network, [torch.rand(2, 1, 64, 64)], example)
    save_quantized(bundle / "models" / "model_int8.pt2", int8_network, example)
    return bundle


def start_console(*args: str) -> subprocess.Popen:
    """Start ``python *args`` as a user would, with Python warnings shown; stdout and stderr in one pipe."""
    env = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")
    command = [sys.executable, *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_inference_paths_show_no_import_noise_or_misleading_warnings(seg_bundle, images_2d, tmp_path):
    input_dir = str(images_2d[0].parent)
    inference_json = str(seg_bundle / "configs" / "inference.json")
    bundle_run = ("-m", "monai.bundle", "run", "--config_file", inference_json, "--input_dir", input_dir)
    batch_cli = ("-m", "monai_qsa", "infer", "--bundle", str(seg_bundle), "--input", input_dir)
    runs = {
        "inference.json fp32": bundle_run,
        # int8 eager here (the notices come from importing torchao, not from compiling); the CLI below compiles it
        "inference.json int8": (*bundle_run, "--use_int8", "True", "--compile", "False"),
        "infer fp32": batch_cli,
        "infer int8": (*batch_cli, "--int8"),
    }
    output_dirs = {name: tmp_path / name.replace(" ", "_") for name in runs}
    processes = {  # side by side: each run is mostly single-threaded start-up
        name: start_console(*args, "--output_dir" if "inference.json" in name else "--output", str(output_dirs[name]))
        for name, args in runs.items()
    }
    try:
        outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()  # no-op for finished runs; a timed-out run is not left behind
    for name, output in outputs.items():
        assert processes[name].returncode == 0, f"{name} failed:\n{output[-4000:]}"
        assert not noise_in(output), f"{name} printed: {noise_in(output)}"
        for image in images_2d:
            seg = nib.load(output_dirs[name] / image.name.replace(".nii.gz", "_seg.nii.gz"))
            assert seg.shape == nib.load(image).shape, name


def test_2d_orientation_inverts_without_warning_and_as_monai_does(images_2d):
    def invert_prediction(orientation) -> tuple[torch.Tensor, list[str]]:
        preprocessing = Compose(
            [
                LoadImaged("image", image_only=True),
                EnsureChannelFirstd("image"),
                orientation(keys="image", axcodes="RA", labels=None),
                Spacingd("image", pixdim=(1.0, 1.0)),
            ]
        )
        data = preprocessing({"image": str(images_2d[0])})
        data["pred"] = torch.cat([data["image"], 1 - data["image"]])  # a two-channel prediction on the network's grid
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pred = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
        return pred, [str(warning.message) for warning in caught]

    monai_pred, monai_warnings = invert_prediction(MonaiOrientationd)
    pred, caught = invert_prediction(Orientationd)
    assert any(re.search(NOISE["2D axcodes"], message) for message in monai_warnings)  # the defect this class fixes
    assert not caught
    assert pred.shape[1:] == nib.load(images_2d[0]).shape
    torch.testing.assert_close(pred.as_tensor(), monai_pred.as_tensor())
    torch.testing.assert_close(pred.affine, monai_pred.affine)  # the input's 4x4 affine, z offset included
    torch.testing.assert_close(pred.affine, torch.as_tensor(nib.load(images_2d[0]).affine, dtype=pred.affine.dtype))


def _targets(config: object) -> list[str]:
    if isinstance(config, dict):
        own = [config["_target_"]] if isinstance(config.get("_target_"), str) else []
        return own + [target for value in config.values() for target in _targets(value)]
    if isinstance(config, list):
        return [target for value in config for target in _targets(value)]
    return []


def test_bundle_config_targets_name_one_component_each():
    for module in pkgutil.walk_packages(monai_qsa.__path__, "monai_qsa."):
        importlib.import_module(module.name)  # MONAI's locator sees every loaded module whose name starts with monai
    locator = ComponentLocator()
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        for target in _targets(json.loads(config.read_text())):
            module = locator.get_component_module_name(target) if "." not in target else target
            assert not isinstance(module, list), f"{config}: _target_ {target!r} names several components: {module}"


def test_import_noise_is_demoted_to_debug_and_other_messages_pass(caplog):
    caplog.set_level(logging.DEBUG)
    intmm = logging.getLogger("torchao.kernel.intmm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_import_noise():
            intmm.warning("Warning: Detected no triton, on systems without Triton certain kernels will not work")
            intmm.warning("an unrelated torchao warning")
            warnings.warn("`torch.jit.script_method` is deprecated. Please switch to", DeprecationWarning, stacklevel=1)
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        intmm.warning("Detected no triton (after the import)")
    assert [str(warning.message) for warning in caught] == ["an unrelated warning"]
    records = [(record.name, record.levelno, record.getMessage()) for record in caplog.records]
    assert [(name, message) for name, level, message in records if level >= logging.WARNING] == [
        ("torchao.kernel.intmm", "an unrelated torchao warning"),
        ("torchao.kernel.intmm", "Detected no triton (after the import)"),
    ]
    own_debug = ("monai_qsa.utils.third_party", logging.DEBUG)
    demoted = [message for name, level, message in records if (name, level) == own_debug]
    assert len(demoted) == 2 and "Detected no triton" in demoted[0] and "torch.jit.script_method" in demoted[1]
