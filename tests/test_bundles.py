"""Each bundle through the real ``python -m monai.bundle`` CLI in a subprocess, on a small synthetic dataset, with
the bundle copied to a temporary folder (so a developer's trained models in bundles/ are never touched)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_qsa.data import load_datalist, make_synthetic_dataset
from monai_qsa.data.synthetic import CLASS_NAMES
from monai_qsa.models import recorded_network_definition

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("sa_seg", "sa_seg3d", "sa_cls")
BUNDLE_TASKS = {"sa_seg": "seg2d", "sa_seg3d": "seg3d", "sa_cls": "cls"}
#: keep the int8 step of train.json short: eager timing, few calibration batches
QUICK_QUANTISATION = [
    "--quantization#compile",
    "False",
    "--quantization#latency_repeats",
    "1",
    "--quantization#num_calibration_batches",
    "2",
]


def bundle_cli(*args: str, cwd: Path, torchrun: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run(
        [*launcher, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def configs(bundle: Path, *names: str) -> str:
    return "[" + ",".join(repr(str(bundle / "configs" / name)) for name in names) + "]"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def copy_bundle(name: str, workdir: Path) -> Path:
    target = workdir / name
    shutil.copytree(
        REPO / "bundles" / name, target, ignore=shutil.ignore_patterns("models", "logs", "eval", "data", "predictions")
    )
    return target


def small_dataset(name: str, workdir: Path) -> Path:
    root = workdir / f"data_{name}"
    counts = {"sa_seg": (8, 2, 2), "sa_seg3d": (4, 2, 2), "sa_cls": (24, 8, 4)}[name]
    make_synthetic_dataset(BUNDLE_TASKS[name], root, seed=1, num_cases=counts)
    return root


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_and_network_shapes_verify(name):
    bundle = REPO / "bundles" / name
    meta = str(bundle / "configs" / "metadata.json")
    bundle_cli(
        "verify_metadata", "--meta_file", meta, "--filepath", str(REPO / "bundles" / "meta_schema.json"), cwd=REPO
    )
    bundle_cli(
        "verify_net_in_out",
        "--meta_file",
        meta,
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--net_id",
        "network_def",
        cwd=REPO,
    )


@pytest.mark.parametrize("name", ["sa_seg", "sa_seg3d"])
def test_segmentation_bundle_train_evaluate_infer(name, workdir, tmp_path):
    bundle, data = copy_bundle(name, workdir), small_dataset(name, workdir)
    # run from an unrelated folder: every output must land under the bundle root
    bundle_cli(
        "run",
        "--config_file",
        configs(bundle, "train.json"),
        "--dataset_dir",
        str(data),
        "--num_epochs",
        "2",
        "--val_interval",
        "1",
        *QUICK_QUANTISATION,
        cwd=tmp_path,
    )
    assert not list(tmp_path.iterdir())
    for output in (
        "models/model.pt",
        "models/model_int8.pt2",
        "models/quantization_report.json",
        "models/checkpoint_epoch=2.pt",
        "logs/energy.csv",
    ):
        assert (bundle / output).is_file(), output
    report = json.loads((bundle / "models/quantization_report.json").read_text())
    assert report["accepted"] and report["key_metric"] == "val_mean_dice"
    with open(bundle / "logs/energy.csv") as file:
        phases = {row["phase"] for row in csv.DictReader(file)}
    assert phases == {"train", "validate"}

    bundle_cli(
        "run",
        "--config_file",
        configs(bundle, "train.json", "evaluate.json"),
        "--dataset_dir",
        str(data),
        "--compile_int8",
        "False",
        cwd=bundle,
    )
    for precision in ("fp32", "int8"):
        assert (bundle / "eval" / precision / "metrics.csv").is_file()
    with open(bundle / "eval/energy.csv") as file:
        assert {row["phase"] for row in csv.DictReader(file)} == {"evaluate_fp32", "evaluate_int8"}

    test_images = sorted((data / "imagesTs").iterdir())
    for int8, output in ((False, tmp_path / "fp32"), (True, tmp_path / "int8")):
        bundle_cli(
            "run",
            "--config_file",
            configs(bundle, "inference.json"),
            "--input_dir",
            str(data / "imagesTs"),
            "--output_dir",
            str(output),
            "--use_int8",
            str(int8),
            "--compile",
            "False",
            cwd=REPO,
        )
        for image_path in test_images:
            image, seg = nib.load(image_path), nib.load(output / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
            assert seg.shape == image.shape
            np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)  # oblique, anisotropic, flipped input
            assert set(np.unique(seg.get_fdata())) <= {0, 1}
    assert sorted(p.name for p in (data / "imagesTs").iterdir()) == [p.name for p in test_images]  # inputs untouched


def test_classification_bundle_train_evaluate_infer(workdir, tmp_path):
    bundle, data = copy_bundle("sa_cls", workdir), small_dataset("sa_cls", workdir)
    bundle_cli(
        "run",
        "--config_file",
        configs(bundle, "train.json"),
        "--dataset_dir",
        str(data),
        "--num_epochs",
        "2",
        "--val_interval",
        "1",
        "--network_def#block_inplanes",
        "[8,16,32,64]",  # the network travels with the model: every consumer below serves this one
        *QUICK_QUANTISATION,
        cwd=bundle,
    )
    report = json.loads((bundle / "models/quantization_report.json").read_text())
    assert report["key_metric"] == "val_accuracy" and (bundle / "models/model_int8.pt2").is_file() == report["accepted"]
    recorded = recorded_network_definition(bundle / "models/model.pt")
    assert recorded["_target_"].endswith("SAResNet") and recorded["block_inplanes"] == [8, 16, 32, 64]
    bundle_cli(
        "run",
        "--config_file",
        configs(bundle, "train.json", "evaluate.json"),
        "--dataset_dir",
        str(data),
        "--compile_int8",
        "False",
        cwd=bundle,
    )
    assert (bundle / "eval/fp32/metrics.csv").is_file()
    bundle_cli(
        "run",
        "--config_file",
        configs(bundle, "inference.json"),
        "--input_dir",
        str(data / "imagesTs"),
        "--output_dir",
        str(tmp_path),
        cwd=REPO,
    )
    with open(tmp_path / "probabilities.csv") as file:
        rows = list(csv.reader(file))
    names = sorted(p.name for p in (data / "imagesTs").iterdir())
    assert sorted(Path(row[0]).name.split(".")[0] for row in rows) == sorted(n.split(".")[0] for n in names)
    for row in rows:
        probabilities = [float(v) for v in row[1:]]
        assert len(probabilities) == len(CLASS_NAMES) and abs(sum(probabilities) - 1) < 1e-4
    served = subprocess.run(
        [sys.executable, "-m", "monai_qsa", "infer", "--bundle", str(bundle), "--input", str(data / "imagesTs")]
        + ["--output", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    with open(tmp_path / "cli" / "probabilities.csv") as file:
        assert len(list(csv.reader(file))) == len(rows) + 1  # header + one row per image


def test_multi_gpu_train_with_torchrun_on_cpu_and_resume(workdir):
    bundle, data = copy_bundle("sa_seg", workdir / "ddp"), small_dataset("sa_seg", workdir / "ddp")
    ddp = configs(bundle, "train.json", "multi_gpu_train.json")
    bundle_cli(
        "run",
        "--config_file",
        ddp,
        "--dataset_dir",
        str(data),
        "--num_epochs",
        "1",
        "--val_interval",
        "1",
        cwd=bundle,
        torchrun=True,
    )
    assert (bundle / "models/model.pt").is_file() and (bundle / "models/checkpoint_epoch=1.pt").is_file()
    # resume from the last checkpoint: epoch 2 only
    result = bundle_cli(
        "run",
        "--config_file",
        ddp,
        "--dataset_dir",
        str(data),
        "--num_epochs",
        "2",
        "--val_interval",
        "5",
        "--resume",
        "True",
        cwd=bundle,
        torchrun=True,
    )
    log = result.stdout + result.stderr
    assert (bundle / "models/checkpoint_epoch=2.pt").is_file()
    assert (
        "SupervisedTrainer - INFO - Epoch[2] Complete" in log
        and "SupervisedTrainer - INFO - Epoch[1] Complete" not in log
    )


def test_malformed_dataset_dir_fails_early_naming_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no dataset.json"):
        load_datalist(empty, "seg2d")

    data = tmp_path / "data"
    make_synthetic_dataset("seg2d", data, num_cases=(3, 1, 0))
    description = json.loads((data / "dataset.json").read_text())
    missing = data / description["training"][0]["image"]
    missing.rename(missing.with_suffix(".moved"))
    with pytest.raises(FileNotFoundError, match=missing.name):
        load_datalist(data, "seg2d")
    missing.with_suffix(".moved").rename(missing)

    label = data / description["training"][1]["label"]
    nib.save(nib.Nifti1Image(np.zeros((10, 10), np.uint8), np.eye(4)), label)
    with pytest.raises(ValueError, match=f"{label.name}.*shape"):
        load_datalist(data, "seg2d")

    bad_cls = tmp_path / "cls"
    make_synthetic_dataset("cls", bad_cls, num_cases=(3, 1, 0))
    description = json.loads((bad_cls / "dataset.json").read_text())
    description["training"][0]["label"] = 7
    (bad_cls / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="label 7 of .*not a class index"):
        load_datalist(bad_cls, "cls")

    # and through the bundle CLI: the run stops before training, naming the file
    (empty / "dataset.json").write_text("{not json")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(REPO / "bundles/sa_seg/configs/train.json"),
            "--dataset_dir",
            str(empty),
            "--bundle_root",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and f"{empty / 'dataset.json'} is not valid JSON" in result.stderr
    assert not (tmp_path / "b" / "models").exists()


def test_synthetic_dataset_is_deterministic_and_never_overwrites(tmp_path):
    first, second = (
        make_synthetic_dataset("seg3d", tmp_path / "a", num_cases=(2, 1, 1)),
        make_synthetic_dataset("seg3d", tmp_path / "b", num_cases=(2, 1, 1)),
    )
    assert first.read_text() == second.read_text()
    image_a, image_b = (
        nib.load(tmp_path / "a/imagesTr/seg3d_tra_000.nii.gz"),
        nib.load(tmp_path / "b/imagesTr/seg3d_tra_000.nii.gz"),
    )
    np.testing.assert_array_equal(image_a.get_fdata(), image_b.get_fdata())
    assert not np.allclose(image_a.affine[:3, :3], np.diag(np.diag(image_a.affine[:3, :3])))  # oblique
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_dataset("seg3d", tmp_path / "a")
