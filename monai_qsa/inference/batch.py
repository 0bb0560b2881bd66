"""Batch inference of a bundle over a folder of images: one case in memory at a time, per-file error reports,
resumable (finished outputs are skipped, outputs appear only complete), shardable across torchrun ranks."""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from monai_qsa.data.datalist import IMAGE_SUFFIXES
from monai_qsa.inference.bundle_runner import BundleRunner, CaseError
from monai_qsa.utils.csv_rows import append_csv_row
from monai_qsa.utils.energy import EnergyMeter
from monai_qsa.utils.nifti import save_nifti

__all__ = ["run_batch_inference", "list_inputs", "case_stem", "output_path", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ("file", "status", "reason", "output", "latency_s", "energy_j", "energy_method")
PROBABILITIES_CSV = "probabilities.csv"

logger = logging.getLogger(__name__)


@dataclass
class CaseRecord:
    """One line of the run summary."""

    file: str
    status: str  # ok, skipped, failed
    reason: str = ""
    output: str = ""
    latency_s: float | str = ""
    energy_j: float | str = ""
    energy_method: str = ""


def _is_detached_data(path: Path) -> bool:
    """Pixel data of a detached-header image (``x.raw`` of ``x.mhd`` / ``x.nhdr``): read through its header."""
    return path.name.lower().endswith((".raw", ".zraw", ".raw.gz")) and any(
        path.with_name(path.name.split(".")[0] + header).is_file() for header in (".mhd", ".nhdr")
    )


def list_inputs(input_dir: Path, recursive: bool) -> list[Path]:
    """Every regular, non-hidden file under ``input_dir`` (supported or not: unsupported ones are reported), except
    the pixel-data files of detached headers."""
    files = input_dir.rglob("*") if recursive else input_dir.iterdir()
    return sorted(
        p for p in files
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(input_dir).parts) and not _is_detached_data(p)
    )


def case_stem(path: Path) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_path(input_dir: Path, output_dir: Path, path: Path) -> Path:
    """``<output_dir>/<relative folder>/<name>_seg.nii.gz`` for input ``path``."""
    relative = path.relative_to(input_dir)
    return output_dir / relative.parent / f"{case_stem(path)}_seg.nii.gz"


def _done_classifications(csv_path: Path) -> set[str]:
    if not csv_path.is_file():
        return set()
    with open(csv_path, newline="") as f:
        return {row["file"] for row in csv.DictReader(f)}


def _process(runner: BundleRunner, meter: EnergyMeter, path: Path, input_dir: Path, output_dir: Path) -> CaseRecord:
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        return CaseRecord(file=str(path), status="failed", reason=f"unsupported extension (reads {', '.join(IMAGE_SUFFIXES)})")
    meter.start()
    try:
        result = runner.run(path)
    except CaseError as error:
        meter.stop()
        return CaseRecord(file=str(path), status="failed", reason=str(error))
    reading = meter.stop(samples=1)
    record = CaseRecord(file=str(path), status="ok", latency_s=round(result.seconds, 4))
    if reading is not None:
        record.energy_j, record.energy_method = round(reading.joules, 3), reading.method
    if runner.is_segmentation:
        target = output_path(input_dir, output_dir, path)
        save_nifti(result.pred, target, dtype="uint8")
        record.output = str(target)
    else:
        probabilities = [float(v) for v in result.pred.flatten()]
        names = [runner.labels.get(str(i), str(i)) for i in range(len(probabilities))]
        row = {"file": str(path), **{f"p_{name}": value for name, value in zip(names, probabilities)}}
        append_csv_row(output_dir / PROBABILITIES_CSV, row, tuple(row))
        record.output = str(output_dir / PROBABILITIES_CSV)
    return record


def _rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def run_batch_inference(
    bundle: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    int8: bool = False,
    recursive: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> int:
    """Run ``bundle``'s inference over every file in ``input_dir``; see ``python -m monai_qsa infer --help``.

    Returns:
        the exit status: 0 if no file failed, 1 otherwise.

    Raises:
        ValueError / FileNotFoundError: whole-run errors (missing or empty input folder, output folder inside the
            input folder, not a bundle).
    """
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir} is not a folder.")
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise ValueError(f"--output {output_dir} is inside --input {input_dir}: outputs would mix with (and be read as) inputs.")
    files = list_inputs(input_dir, recursive)
    if not files:
        raise ValueError(f"--input {input_dir} holds no file{' (searched recursively)' if recursive else ''}.")
    rank, world = _rank_and_world()
    runner = BundleRunner(bundle, int8=int8, device=device)
    output_dir.mkdir(parents=True, exist_ok=True)
    done = set() if runner.is_segmentation or overwrite else _done_classifications(output_dir / PROBABILITIES_CSV)
    stamp = [time.strftime("%Y%m%d_%H%M%S", time.gmtime())]
    if world > 1:
        dist.broadcast_object_list(stamp, src=0)  # one run, one summary name
    summary = output_dir / f"inference_summary_{stamp[0]}.csv"
    shard = files[rank::world]
    meter = EnergyMeter()
    failed = 0
    for path in tqdm(shard, desc=f"infer{'' if world == 1 else f' rank {rank}'}", unit="case", disable=rank > 0 and world > 1):
        if (runner.is_segmentation and not overwrite and output_path(input_dir, output_dir, path).exists()) or str(path) in done:
            record = CaseRecord(file=str(path), status="skipped", reason="output exists (use --overwrite to redo)")
        else:
            try:
                record = _process(runner, meter, path, input_dir, output_dir)
            except Exception as error:  # a bug or I/O failure on one file must not stop the batch
                logger.exception(f"{path}: unexpected failure")
                record = CaseRecord(file=str(path), status="failed", reason=f"{type(error).__name__}: {error}")
        failed += record.status == "failed"
        if record.status == "failed":
            logger.warning(f"{path}: {record.reason}")
        append_csv_row(summary if world == 1 else _rank_part(summary, rank), asdict(record), SUMMARY_COLUMNS)
    if world > 1:
        failed = _merge_rank_summaries(summary, world, rank, failed)
    if rank == 0:
        logger.info(f"summary written to {summary}")
    return 1 if failed else 0


def _rank_part(summary: Path, rank: int) -> Path:
    return summary.with_name(f"{summary.stem}.rank{rank}.csv")


def _merge_rank_summaries(summary: Path, world: int, rank: int, failed: int) -> int:
    """Sum the failures of all ranks; rank 0 merges the per-rank summaries into one file, sorted by input."""
    total = torch.tensor([failed])
    dist.all_reduce(total)  # also the point where every rank has finished its shard
    if rank == 0:
        rows = []
        for part in (_rank_part(summary, r) for r in range(world)):
            if part.is_file():  # a rank with an empty shard wrote none
                with open(part, newline="") as f:
                    rows.extend(csv.DictReader(f))
                part.unlink()
        for row in sorted(rows, key=lambda r: r["file"]):
            append_csv_row(summary, row, SUMMARY_COLUMNS)
    dist.barrier()
    dist.destroy_process_group()
    return int(total.item())
