"""Batch inference throughput and peak memory of ``python -m monai_qsa infer`` on the sa_seg3d bundle for 1, 10
and 50 synthetic 3D volumes, fp32 vs int8. Memory must not grow with the number of files. Prints medians and
ratios measured in this run.

The bundle is copied to a temporary folder; it uses the trained models of ``bundles/sa_seg3d/models`` if present
(run its train.json first), otherwise freshly initialised fp32 weights quantised on random calibration data
(throughput and memory do not depend on the weights).

    python perf/bench_inference.py [--counts 1 10 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from monai_qsa.quantization import quantize_ptq, save_quantized

REPO = Path(__file__).resolve().parents[1]


def prepare_bundle(root: Path) -> Path:
    bundle = root / "sa_seg3d"
    # models written afresh by this version of the code (throughput does not depend on training); a local
    # bundles/sa_seg3d/models may hold artifacts of older versions
    shutil.copytree(
        REPO / "bundles" / "sa_seg3d",
        bundle,
        ignore=shutil.ignore_patterns("models", "logs", "eval", "data", "predictions"),
    )
    models = bundle / "models"
    models.mkdir()
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def").eval()
    torch.save(network.state_dict(), models / "model.pt")
    example = torch.rand(2, 1, 48, 48, 48)
    save_quantized(models / "model_int8.pt2", quantize_ptq(network, [example], example), example)
    return bundle


def write_volumes(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.diag([1.2, 1.2, 1.6, 1.0])
    for index in range(count):
        image = rng.normal(200, 40, (64, 64, 48)).astype(np.float32)
        image[20:40, 18:36, 10:30] += 700
        nib.save(nib.Nifti1Image(image, affine), folder / f"vol_{index:03d}.nii.gz")


def run(bundle: Path, inputs: Path, outputs: Path, int8: bool) -> tuple[float, int]:
    """Wall time and peak resident memory (bytes) of one ``infer`` process."""
    command = [
        sys.executable,
        "-c",
        "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\ntry:\n    runpy.run_module('monai_qsa', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
        "monai_qsa",
        "infer",
        "--bundle",
        str(bundle),
        "--input",
        str(inputs),
        "--output",
        str(outputs),
    ] + (["--int8"] if int8 else [])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return seconds, int(re.search(r"PEAK_KB (\d+)", result.stdout)[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = prepare_bundle(root)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; volumes 64x64x48; "
            "wall time includes process start and model load"
        )
        print(f"{'files':>6s} {'precision':9s} {'wall s':>8s} {'cases/min':>10s} {'peak MiB':>9s}")
        results = {}
        for count in args.counts:
            inputs = root / f"in_{count}"
            write_volumes(inputs, count)
            for int8 in (False, True):
                seconds, peak = run(bundle, inputs, root / f"out_{count}_{int8}", int8)
                results[(count, int8)] = (count / seconds * 60, peak)
                print(
                    f"{count:6d} {'int8' if int8 else 'fp32':9s} {seconds:8.1f} "
                    f"{count / seconds * 60:10.1f} {peak / 2**20:9.0f}"
                )
        for count in args.counts:
            print(f"{count} files: int8/fp32 throughput {results[(count, True)][0] / results[(count, False)][0]:.2f}x")
        first, last = args.counts[0], args.counts[-1]
        for int8 in (False, True):
            print(
                f"{'int8' if int8 else 'fp32'}: peak memory {last} files / {first} file(s) = "
                f"{results[(last, int8)][1] / results[(first, int8)][1]:.2f}x"
            )


if __name__ == "__main__":
    main()
