"""What a user waits for: ``python -m monai_qsa infer`` (:func:`monai_qsa.inference.batch.run_batch_inference`) on
synthetic volumes of clinical size, timed from the outside in a fresh process.

The model runs through a copy of the task bundle's configs whose ``network_def`` (and ``compile``) are the timed
model's, with its ``model.pt`` or ``model_int8.pt2``; four identical volumes are processed, so that the first output
shows the cold start (model load, compilation, first case) and the median time between the later outputs one case
end to end (load, preprocessing, sliding window, inversion, save).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_qsa.benchmark.run import run_in_process

__all__ = ["time_end_to_end", "write_clinical_volume", "deployable_bundle"]

#: the volumes of one timing: the first is the cold start, the others give the warm medians
_CASES = ("case_a", "case_b", "case_c", "case_d")


def write_clinical_volume(path: Path, shape: Sequence[int], spacing_mm: float = 1.0, seed: int = 0) -> Path:
    """A synthetic image of ``shape`` (2D or 3D) at ``spacing_mm``: a smooth background, noise and a few bright
    ellipsoids, as float32 NIfTI.

    Raises:
        ValueError: ``shape`` is not 2D or 3D, or has a side below 16.
    """
    import nibabel as nib

    if len(shape) not in (2, 3) or min(shape) < 16:
        raise ValueError(f"shape must be 2D or 3D with sides of at least 16, got {list(shape)}.")
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    image = 0.2 + 0.1 * sum(grids) + rng.normal(0, 0.1, shape).astype(np.float32)
    for _ in range(4):
        centre = rng.uniform(-0.6, 0.6, len(shape))
        radii = rng.uniform(0.05, 0.2, len(shape))
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
        image = image + 0.7 * inside
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([spacing_mm] * 3 + [1.0])), str(path))
    return path


def deployable_bundle(bundle_dir: Path, target: Path, network_def: dict, model_file: Path, int8: bool, compile: bool):
    """A copy of ``bundle_dir``'s configs in ``target`` that serves ``model_file`` with ``network_def``.

    Returns:
        ``target``.
    """
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle_dir / "configs", target / "configs")
    inference = target / "configs" / "inference.json"
    config = json.loads(inference.read_text())
    config |= {"network_def": network_def, "compile": compile}
    inference.write_text(json.dumps(config, indent=2))
    (target / "models").mkdir()
    shutil.copyfile(model_file, target / "models" / ("model_int8.pt2" if int8 else "model.pt"))
    return target


def time_end_to_end(
    bundle_dir: Path,
    network_def: dict,
    model_file: Path,
    int8: bool,
    compile: bool,
    shape: Sequence[int],
    threads: int,
    work_dir: Path,
    retime: bool = False,
) -> dict:
    """``python -m monai_qsa infer`` on four identical synthetic volumes of ``shape`` at 1 mm, in a fresh process with
    ``threads`` threads; reused from ``work_dir`` when the same model file was timed with the same settings, unless
    ``retime``.

    Args:
        bundle_dir: the task bundle (its ``configs/inference.json`` pipeline).
        network_def: the network of ``model_file``.
        model_file: fp32 checkpoint or int8 artifact.
        int8: ``model_file`` is an int8 artifact.
        compile: compile the network (int8 always is).
        shape: volume size (voxels).
        threads: CPU threads.
        work_dir: volumes, bundle copies, outputs and the cached results.
        retime: time again even where a result of the same settings exists.

    Returns:
        ``{"wall_s": the whole command, "first_case_s": start to the first output (model load and compilation
        included), "case_s": one case end to end (median time between successive later outputs), "network_s": the
        later cases' median network time, "energy_j": their median energy from load to postprocessing (None if
        unavailable), "energy_method"}``.

    Raises:
        RuntimeError: the inference process failed, with the end of its error output.
    """
    spec = {
        "bundle_dir": str(bundle_dir),
        "network_def": network_def,
        "model_file": str(model_file),
        "model_mtime_ns": Path(model_file).stat().st_mtime_ns,
        "int8": int8,
        "compile": compile,
        "shape": list(shape),
        "threads": threads,
        "cases": list(_CASES),
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    result_path = work_dir / f"{key}.json"
    if result_path.is_file() and not retime:
        return json.loads(result_path.read_text())
    volume = work_dir / "volumes" / f"{'x'.join(map(str, shape))}.nii.gz"
    if not volume.is_file():
        write_clinical_volume(volume, shape)
    inputs = work_dir / f"input_{key}"
    inputs.mkdir(parents=True, exist_ok=True)
    for case in _CASES:
        shutil.copyfile(volume, inputs / f"{case}.nii.gz")
    bundle = deployable_bundle(
        Path(bundle_dir), work_dir / f"bundle_{key}", network_def, Path(model_file), int8, compile
    )
    result = run_in_process(
        "monai_qsa.benchmark.endtoend",
        {**spec, "bundle": str(bundle), "input": str(inputs)},
        work_dir / f"{key}.spec.json",
        result_path,
        f"end-to-end timing of {model_file}",
    )
    shutil.rmtree(inputs)
    return result


def _run(spec: dict, output: Path) -> dict:
    """Run the inference of ``spec`` into ``output`` and read the times off the outputs and the summary."""
    import torch

    from monai_qsa.inference.batch import run_batch_inference

    torch.set_num_threads(spec["threads"])
    began = time.time()
    status = run_batch_inference(spec["bundle"], spec["input"], output, int8=spec["int8"], overwrite=True)
    wall = time.time() - began
    if status != 0:
        raise RuntimeError(f"inference failed on a case; see the summary in {output}.")
    summary = next(output.glob("inference_summary_*.csv"))
    with summary.open() as rows:
        # in the order their outputs were written
        records = sorted(csv.DictReader(rows), key=lambda r: Path(r["output"]).stat().st_mtime)
    written = [Path(r["output"]).stat().st_mtime for r in records]
    warm = records[1:]
    energies = [float(r["energy_j"]) for r in warm if r["energy_j"]]
    return {
        "wall_s": round(wall, 2),
        "first_case_s": round(written[0] - began, 2),
        "case_s": round(statistics.median(b - a for a, b in zip(written, written[1:])), 2),
        "network_s": statistics.median(float(r["latency_s"]) for r in warm),
        "energy_j": statistics.median(energies) if len(energies) == len(warm) else None,
        "energy_method": warm[0]["energy_method"] or "unavailable (CodeCarbon failed; see the log)",
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    output = spec_path.parent / f"output_{spec_path.name.split('.')[0]}"
    if output.exists():
        shutil.rmtree(output)
    result = _run(spec, output)
    shutil.rmtree(output)
    result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
