"""``python -m monai_qsa infer`` on the 3D bundle: bad inputs mixed with good ones, geometry, interrupt and resume,
and torchrun sharding. The bundle is copied to a temporary folder with freshly initialised weights (geometry and
robustness do not depend on training)."""

import csv
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def infer_cli(*args: str, torchrun: bool = False, env: dict | None = None, **popen) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [*launcher, "-m", "monai_qsa", "infer", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finished(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def summary_rows(output_dir: Path) -> list[dict]:
    (summary,) = sorted(output_dir.glob("inference_summary_*.csv"))[-1:]
    with open(summary, newline="") as f:
        return list(csv.DictReader(f))


def oblique_affine(spacing=(1.3, 0.9, 2.2), degrees=20.0) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-30.0, 12.5, 7.0]
    return affine


def volume(shape=(36, 40, 28), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(200, 40, shape).astype(np.float32)
    image[10:22, 12:26, 8:18] += 700
    return image


@pytest.fixture
def bundle(tmp_path, untrained_bundle) -> Path:
    """sa_seg3d with initialised (untrained) weights saved as models/model.pt."""
    return untrained_bundle("sa_seg3d", tmp_path / "bundle")


def test_bad_inputs_are_reported_and_good_outputs_keep_geometry(bundle, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = {
        "oblique.nii.gz": (volume(), oblique_affine()),
        "plain.nii": (volume((30, 30, 30), 1), np.diag([-0.8, 0.8, 3.0, 1.0])),
    }
    for name, (array, affine) in good.items():
        nib.save(nib.Nifti1Image(array, affine), inputs / name)
    import SimpleITK as sitk

    itk_image = sitk.GetImageFromArray(volume((24, 32, 30), 2))
    itk_image.SetSpacing((0.7, 0.7, 1.5))
    sitk.WriteImage(itk_image, str(inputs / "itk.mha"))
    nib.save(nib.Nifti1Image(volume()[..., 0], np.eye(4)), inputs / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([volume()] * 3, -1), np.eye(4)), inputs / "series4d.nii.gz")
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), np.nan, np.float32), np.eye(4)), inputs / "allnan.nii.gz")
    truncated = gzip.compress((inputs / "plain.nii").read_bytes())
    (inputs / "truncated.nii.gz").write_bytes(truncated[: len(truncated) // 2])
    (inputs / "notanimage.nii.gz").write_bytes(b"this is text, not a NIfTI file")
    (inputs / "readme.txt").write_text("notes")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}

    code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)))
    assert code == 1, log
    rows = {Path(r["file"]).name: r for r in summary_rows(outputs)}
    assert set(rows) == set(before)
    expected_failures = {
        "flat2d.nii.gz": "wrong dimensionality",
        "series4d.nii.gz": "wrong dimensionality",
        "allnan.nii.gz": "no finite value",
        "truncated.nii.gz": "",
        "notanimage.nii.gz": "",
        "readme.txt": "unsupported extension",
    }
    for name, reason in expected_failures.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["reason"], rows[name]
    for name in ("oblique.nii.gz", "plain.nii", "itk.mha"):
        assert rows[name]["status"] == "ok" and float(rows[name]["latency_s"]) > 0, rows[name]
        assert "CodeCarbon" in rows[name]["energy_method"] or "RAPL" in rows[name]["energy_method"]
    for name, (array, affine) in good.items():
        seg = nib.load(outputs / f"{name.split('.')[0]}_seg.nii.gz")
        assert seg.shape == array.shape
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    itk_seg = sitk.ReadImage(str(outputs / "itk_seg.nii.gz"))
    assert itk_seg.GetSize() == itk_image.GetSize()
    np.testing.assert_allclose(itk_seg.GetSpacing(), itk_image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(itk_seg.GetOrigin(), itk_image.GetOrigin(), atol=1e-4)
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # inputs untouched

    # a rerun skips finished cases, retries nothing else into existence, and still reports the failures
    code, _ = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)))
    rows = {Path(r["file"]).name: r for r in summary_rows(outputs)}
    assert code == 1 and rows["oblique.nii.gz"]["status"] == "skipped"


def test_whole_run_errors(bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(empty), "--output", str(tmp_path / "out")))
    assert code == 2 and "holds no file" in log
    code, log = finished(
        infer_cli("--bundle", str(bundle), "--input", str(tmp_path), "--output", str(tmp_path / "out"))
    )
    assert code == 2 and "inside --input" in log


@pytest.fixture(scope="module")
def many_inputs(tmp_path_factory) -> Path:
    inputs = tmp_path_factory.mktemp("many")
    for index in range(8):
        nib.save(
            nib.Nifti1Image(volume((32, 32, 32), index), oblique_affine(degrees=5.0 * index)),
            inputs / f"case_{index}.nii.gz",
        )
    return inputs


def test_interrupted_run_resumes_without_duplicates_or_truncated_files(bundle, many_inputs, tmp_path):
    outputs = tmp_path / "out"
    process = infer_cli("--bundle", str(bundle), "--input", str(many_inputs), "--output", str(outputs))
    deadline = time.time() + 300
    while len(list(outputs.glob("case_*_seg.nii.gz"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {p.name for p in outputs.glob("case_*_seg.nii.gz")}
    assert 2 <= len(done_before) < 8
    for path in outputs.glob("case_*_seg.nii.gz"):
        nib.load(path).get_fdata()  # every visible output is complete

    code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(many_inputs), "--output", str(outputs)))
    assert code == 0, log
    rows = summary_rows(outputs)
    assert sorted(Path(r["file"]).name for r in rows) == sorted(p.name for p in many_inputs.iterdir())
    assert {
        Path(r["file"]).name.replace(".nii.gz", "_seg.nii.gz") for r in rows if r["status"] == "skipped"
    } == done_before
    assert sorted(p.name for p in outputs.glob("*_seg.nii.gz")) == sorted(
        p.name.replace(".nii.gz", "_seg.nii.gz") for p in many_inputs.iterdir()
    )
    assert not [p for p in outputs.iterdir() if ".partial" in p.name or p.name == ".claims"]  # the killed run's too

    # with every output there, a rerun skips everything without loading the model (here: without one to load)
    (bundle / "models" / "model.pt").unlink()
    code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(many_inputs), "--output", str(outputs)))
    assert code == 0, log
    assert [r["status"] for r in summary_rows(outputs)] == ["skipped"] * 8


def test_torchrun_processes_every_file_once(bundle, many_inputs, tmp_path):
    outputs = tmp_path / "out"
    code, log = finished(
        infer_cli("--bundle", str(bundle), "--input", str(many_inputs), "--output", str(outputs), torchrun=True)
    )
    assert code == 0, log
    rows = summary_rows(outputs)
    assert sorted(Path(r["file"]).name for r in rows) == sorted(p.name for p in many_inputs.iterdir())
    assert all(r["status"] == "ok" for r in rows)
    assert len(list(outputs.glob("inference_summary_*"))) == 1  # the per-rank parts were merged
