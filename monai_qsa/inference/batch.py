"""Batch inference of a bundle over a folder of images: one case in memory at a time, per-file error reports, every
input accounted for in the summary, resumable (finished outputs are skipped, outputs appear only complete), safe for
concurrent runs into one output folder (cases are claimed), shardable across torchrun ranks. See
``docs/inference.md``."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import logging
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from monai_qsa.data.folders import InputEntry, scan_inputs
from monai_qsa.inference.bundle_runner import (
    BundleRunner,
    CaseError,
    CaseResult,
    bundle_metadata,
    describe_error,
    parse_device,
    predicts_segmentation,
)
from monai_qsa.inference.cases import (
    BundleLoadError,
    CaseRecord,
    OutputFolderError,
    ProbabilitiesFileError,
    case_record,
)
from monai_qsa.inference.claims import CaseClaim, remove_claims_folder
from monai_qsa.inference.inputs import assign_outputs, output_path
from monai_qsa.utils.csv_rows import append_csv_row
from monai_qsa.utils.energy import EnergyMeter
from monai_qsa.utils.files import atomic_write, partial_files
from monai_qsa.utils.nifti import save_nifti

__all__ = [
    "run_batch_inference",
    "SUMMARY_COLUMNS",
    "OutputFolderError",
    "BundleLoadError",
    "ProbabilitiesFileError",
    "OtherRankError",
]

SUMMARY_COLUMNS = ("file", "status", "reason", "output", "latency_s", "energy_j", "energy_method")
PROBABILITIES_CSV = "probabilities.csv"
EXISTS = "output exists (use --overwrite to redo)"

logger = logging.getLogger(__name__)


class OtherRankError(ValueError):
    """Under torchrun, another rank stopped on a whole-run error: this rank stops too (same exit status)."""


class _OtherRankCrash(RuntimeError):
    """Under torchrun, another rank stopped on an unexpected error: this rank stops too."""


class _Unlinked(Exception):
    """A summary part's temporary file was removed by a concurrent run's clean-up before it was locked."""


def check_output_writable(output_dir: Path) -> None:
    """Create ``output_dir`` if needed and write (then remove) one small file in it.

    Raises:
        OutputFolderError: the folder cannot be created or written, with the system's reason.
    """
    probe = output_dir / f".write_check.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            try:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            finally:
                probe.unlink()
    except OSError as error:
        raise OutputFolderError(f"--output {output_dir} cannot be written: {error.strerror or error}.") from error


class _SummaryPart:
    """One process's rows of the run summary, in a hidden file it keeps locked while it runs, so that a part left
    by a killed run is recognised (its lock is free) and removed by the next run."""

    PATTERNS = (
        ".inference_summary_*.partial.csv",  # parts
        ".partial.*..inference_summary_*.partial.csv",  # parts being created (atomic_write's temporary names)
        ".inference_summary_*.partial.csv.creating",  # parts being created, as earlier versions named them
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        while True:
            try:
                self._file = self._create(path)
                break
            except _Unlinked:
                continue
        self._writer = csv.DictWriter(self._file, fieldnames=SUMMARY_COLUMNS)
        self._writer.writeheader()
        self._file.flush()

    @staticmethod
    def _create(path: Path):
        """``path`` created empty and locked (it is locked before it takes a name other runs look at)."""
        with atomic_write(path) as creating:
            file = open(creating, "w", newline="")  # noqa: SIM115 (open, and locked, for the whole run)
            try:
                fcntl.flock(file, fcntl.LOCK_EX)
                if os.fstat(file.fileno()).st_nlink == 0:  # removed by remove_stale between open and lock
                    raise _Unlinked
            except BaseException:
                file.close()
                raise
        return file

    def write(self, record: CaseRecord) -> None:
        self._writer.writerow(asdict(record))
        self._file.flush()

    def close(self, remove: bool) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a buffer that cannot be flushed (no space left) is discarded anyway
            self._file.close()

    @classmethod
    def remove_stale(cls, output_dir: Path) -> None:
        """Remove the parts of killed runs, and the temporary files of parts they were creating (nobody holds
        their lock)."""
        stale = sorted({path for pattern in cls.PATTERNS for path in output_dir.glob(pattern)})
        for part in stale:
            try:
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:  # gone already, or not a plain file of a run (a symlink): left alone
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                part.unlink(missing_ok=True)
            except BlockingIOError:
                pass  # a live run's part
            finally:
                os.close(fd)


def _write_summary(summary: Path, parts: list[Path]) -> None:
    """Merge the summary parts into ``summary``, sorted by input, written through :func:`atomic_write`."""
    rows = []
    for part in parts:
        with open(part, newline="") as f:
            rows.extend(csv.DictReader(f))
    with atomic_write(summary) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["file"]))
        f.flush()
        os.fsync(f.fileno())


def probability_columns(metadata: dict) -> tuple[str, ...]:
    """The columns of ``probabilities.csv`` for a classification bundle: ``file``, then ``p_<class name>`` for each
    output channel (its number from ``num_channels``, names from ``channel_def``, the index where there is none)."""
    pred = metadata["network_data_format"]["outputs"]["pred"]
    labels = pred.get("channel_def", {})
    count = int(pred.get("num_channels", len(labels)))
    return ("file", *(f"p_{labels.get(str(i), str(i))}" for i in range(count)))


class _ClassifiedFiles:
    """Inputs already in ``probabilities.csv``, read incrementally (concurrent runs append to it); its header must
    be ``columns``.

    The file is read as bytes from where the last read ended, and only complete records are parsed (a record being
    appended right now is read next time): a record ends at a line break outside quotes, i.e. after an even number
    of quote characters.
    """

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path, self.columns, self.files, self._offset, self._header = path, columns, set(), 0, None

    def __contains__(self, file: str) -> bool:
        self.refresh()
        return file in self.files

    def refresh(self) -> None:
        """Read the records appended since the last call.

        Raises:
            ProbabilitiesFileError: the file is not UTF-8 text or its header is not ``columns``, naming the file.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = record_start = 0
        end = data.find(b"\n")
        while end != -1:
            if data.count(b'"', record_start, end) % 2 == 0:
                complete = record_start = end + 1
            end = data.find(b"\n", end + 1)
        if not complete:
            return
        try:
            text = data[:complete].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProbabilitiesFileError(
                f"{self.path} is not UTF-8 text ({error}); move it away or choose another --output"
            ) from error
        self._offset += complete
        for row in csv.reader(io.StringIO(text, newline="")):
            if not row:  # a blank line (after a line cut by a killed writer)
                continue
            if self._header is None:
                check_probabilities_header(self.path, row, self.columns)
                self._header = row
            else:
                self.files.add(row[0])


def check_probabilities_header(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    """Refuse a ``probabilities.csv`` whose header is not ``columns`` (rows of this bundle would not fit it)."""
    if tuple(header) != columns:
        raise ProbabilitiesFileError(
            f"{path} exists with the columns {header}, but this bundle writes {list(columns)}: its rows cannot be "
            "appended to it. Move the file away or choose another --output (the file is left untouched)."
        )


def _check_probabilities_file(path: Path, columns: tuple[str, ...]) -> None:
    """The up-front check of an existing ``probabilities.csv`` (before any model is loaded)."""
    _ClassifiedFiles(path, columns).refresh()


class _BatchRun:
    """The cases of one process: what is done already, claims, processing, writing outputs."""

    def __init__(
        self,
        bundle: Path,
        input_dir: Path,
        output_dir: Path,
        targets: dict[Path, Path] | None,
        int8: bool,
        overwrite: bool,
        device: str,
    ) -> None:
        self.bundle, self.input_dir, self.output_dir, self.targets = bundle, input_dir, output_dir, targets
        self.int8, self.overwrite, self.device = int8, overwrite, device
        self.columns = probability_columns(bundle_metadata(bundle)) if targets is None else ()
        self.classified = _ClassifiedFiles(output_dir / PROBABILITIES_CSV, self.columns)
        self.started = time.time()
        self.meter = EnergyMeter()
        self._runner: BundleRunner | None = None

    def close(self) -> None:
        """Stop the energy meter's tracker."""
        self.meter.close()

    @property
    def runner(self) -> BundleRunner:
        """The bundle's pipeline, loaded on first use (a run with nothing left to do never loads the model)."""
        if self._runner is None:
            try:
                self._runner = BundleRunner(self.bundle, int8=self.int8, device=self.device)
            except Exception as error:
                reason = describe_error(error)
                raise BundleLoadError(f"cannot load bundle {self.bundle} for inference: {reason}") from error
        return self._runner

    def case(self, path: Path, wait: bool) -> CaseRecord | None:
        """The summary record of one input; ``None`` if another process holds its claim and ``wait`` is False."""
        if self._done_reason(path, concurrent=False):
            return CaseRecord(str(path), "skipped", EXISTS, output=str(self._output_of(path)))
        claim = CaseClaim(self.output_dir, self._key(path))
        try:
            if not claim.acquire(wait):
                return None
        except OSError as error:
            raise OutputFolderError(f"cannot write the claim {claim.path}: {error.strerror or error}") from error
        with claim:
            reason = self._done_reason(path, concurrent=True)
            if reason:
                return CaseRecord(str(path), "skipped", reason, output=str(self._output_of(path)))
            runner = self.runner  # loading errors are whole-run errors, not this file's
            return self._process(runner, path)

    def _output_of(self, path: Path) -> Path:
        return self.targets[path] if self.targets is not None else self.output_dir / PROBABILITIES_CSV

    def _key(self, path: Path) -> str:
        if self.targets is not None:
            return str(self.targets[path].relative_to(self.output_dir))
        return f"{PROBABILITIES_CSV}:{path.relative_to(self.input_dir)}"

    def _done_reason(self, path: Path, concurrent: bool) -> str:
        """Why ``path`` needs no processing (empty if it does); ``concurrent`` (its claim is held): an output that a
        concurrent run wrote since this run started is said to be so, and counts as done even under ``--overwrite``."""
        if self.targets is None:
            return EXISTS if not self.overwrite and str(path) in self.classified else ""
        target = self.targets[path]
        if not target.exists():
            return ""
        if concurrent and target.stat().st_mtime >= self.started:
            return "output written by a concurrent run during this one"
        return "" if self.overwrite else EXISTS

    def _process(self, runner: BundleRunner, path: Path) -> CaseRecord:
        self.meter.start()
        try:
            result = runner.run(path)
        except CaseError as error:
            self.meter.stop()
            return CaseRecord(str(path), "failed", str(error))
        reading = self.meter.stop(samples=1)
        record = CaseRecord(str(path), "ok", result.note, latency_s=round(result.seconds, 4))
        if reading is not None:
            record.energy_j, record.energy_method = round(reading.joules, 3), reading.method
        try:
            record.output = str(self._write(runner, path, result))
        except OSError as error:
            reason = error.strerror or error
            raise OutputFolderError(f"cannot write {self._output_of(path)} (output of {path}): {reason}") from error
        plain = output_path(self.input_dir, self.output_dir, path)
        if self.targets is not None and self.targets[path] != plain:
            notes = [record.reason, "output named after the whole file name: another input has the same name stem"]
            if plain.exists():  # written before the twin was added; no input writes this name any more
                notes.append(f"{plain} (an earlier run's, before the rename) is left in place: remove it if unwanted")
            record.reason = "; ".join(filter(None, notes))
        return record

    def _write(self, runner: BundleRunner, path: Path, result: CaseResult) -> Path:
        if self.targets is not None:
            target = self.targets[path]
            for stale in partial_files(target):  # left by a killed run; this process holds the case's claim
                stale.unlink(missing_ok=True)
            return save_nifti(result.pred, target, dtype="uint8")
        probabilities = [float(v) for v in result.pred.flatten()]
        if len(probabilities) != len(self.columns) - 1:
            raise CaseError(
                f"the bundle gave {len(probabilities)} class probabilities; its metadata declares "
                f"{len(self.columns) - 1} ({', '.join(self.columns[1:])})"
            )
        self.classified.refresh()  # a file created meanwhile by another program with other columns is refused
        row = {"file": str(path), **dict(zip(self.columns[1:], probabilities))}
        append_csv_row(self._output_of(path), row, self.columns)
        return self._output_of(path)


def _rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _summary_name(world: int) -> str:
    """``inference_summary_<UTC time to the microsecond>.csv``, the same on every rank."""
    now = time.time()
    name = [f"inference_summary_{time.strftime('%Y%m%d_%H%M%S', time.gmtime(now))}_{int(now % 1 * 1e6):06d}.csv"]
    if world > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _settle(run: _BatchRun, entry: InputEntry, wait: bool, part: _SummaryPart) -> CaseRecord | None:
    """Process or report one entry and add its record to the summary part; ``None``: claimed by another run."""
    record = case_record(entry, lambda path: run.case(path, wait))
    if record is None:
        logger.info(f"{entry.path}: being processed by another run; checked again at the end")
        return None
    if record.status == "failed":
        logger.warning(f"{entry.path}: {record.reason}")
    try:
        part.write(record)
    except OSError as error:
        raise OutputFolderError(f"cannot write the run summary: {error.strerror or error}") from error
    return record


def _run_shard(run: _BatchRun, shard: list[InputEntry], part: _SummaryPart, progress: bool) -> int:
    """Process a shard; cases claimed by a concurrent run are left to the end, then waited for (if that run
    wrote the output they are skipped). Returns the number of failed files."""
    failed, deferred = 0, []
    with tqdm(total=len(shard), desc="infer", unit="case", disable=not progress) as bar:
        for entry in shard:
            record = _settle(run, entry, False, part)
            if record is None:
                deferred.append(entry)
                continue
            failed += record.status == "failed"
            bar.update()
        for entry in deferred:
            failed += _settle(run, entry, True, part).status == "failed"
            bar.update()
    return failed


def _prepare(
    bundle: Path, input_dir: Path, output_dir: Path, recursive: bool, device: str
) -> tuple[list[InputEntry], dict | None]:
    """Whole-run checks before any model is loaded; the input entries and, for segmentation, their outputs."""
    parse_device(device)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir} is not a folder.")
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise ValueError(
            f"--output {output_dir} is inside --input {input_dir}: outputs would mix with (and be read as) inputs."
        )
    metadata = bundle_metadata(bundle)
    segmentation = predicts_segmentation(metadata)
    entries = scan_inputs(input_dir, recursive)
    if not entries:
        raise ValueError(f"--input {input_dir} holds no file{' (searched recursively)' if recursive else ''}.")
    files = [entry.path for entry in entries if not entry.status]
    targets = assign_outputs(files, input_dir, output_dir) if segmentation else None
    if not segmentation:
        _check_probabilities_file(output_dir / PROBABILITIES_CSV, probability_columns(metadata))
    check_output_writable(output_dir)
    return entries, targets


def run_batch_inference(
    bundle: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    int8: bool = False,
    recursive: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> int:
    """Run ``bundle``'s inference over every file in ``input_dir``; see ``python -m monai_qsa infer --help`` and
    ``docs/inference.md``.

    Returns:
        the exit status: 0 if no file failed, 1 otherwise.

    Raises:
        ValueError / FileNotFoundError: whole-run errors found before the model is loaded (missing or empty input
            folder, output folder inside the input folder, not a bundle, inputs whose outputs would coincide).
        OutputFolderError: the output folder cannot be written, found up front or when a write fails mid-run (the
            run stops there; completed outputs are kept, no summary is written).
        BundleLoadError: the bundle's model or pipeline cannot be loaded.
        ProbabilitiesFileError: ``probabilities.csv`` in ``output_dir`` has other columns than this bundle writes.
        OtherRankError: under torchrun, another rank stopped on a whole-run error (every rank stops with it).
    """
    bundle, input_dir, output_dir = Path(bundle).resolve(), Path(input_dir).resolve(), Path(output_dir).resolve()
    entries, targets = _prepare(bundle, input_dir, output_dir, recursive, device)
    rank, world = _rank_and_world()
    if rank == 0:
        _SummaryPart.remove_stale(output_dir)
    summary = output_dir / _summary_name(world)  # (a broadcast: no rank creates its part before the clean-up)

    def part_path(r: int) -> Path:
        return output_dir / f".{summary.stem}.rank{r}.partial.csv"

    part, run, failed, stopped, error = None, None, 0, None, None
    try:  # every rank reaches the gather below, whatever happens here, so that no rank waits there for ever
        try:
            part = _SummaryPart(part_path(rank))
        except OSError as e:
            raise OutputFolderError(f"--output {output_dir} cannot be written: {e.strerror or e}.") from e
        run = _BatchRun(bundle, input_dir, output_dir, targets, int8=int8, overwrite=overwrite, device=device)
        failed = _run_shard(run, entries[rank::world], part, progress=rank == 0)
    except OutputFolderError as e:
        stopped = e
    except BaseException as e:
        error = e
    finally:
        if run is not None:
            run.close()
    failed, stopped_anywhere, setup_errors, other_errors = _gather(failed, stopped is not None, error, world)
    summary_error = None
    if rank == 0 and not (stopped_anywhere or setup_errors or other_errors):
        try:
            _write_summary(summary, [part_path(r) for r in range(world)])
        except OSError as e:
            summary_error = OutputFolderError(f"cannot write the run summary {summary}: {e.strerror or e}")
    summary_failed = _finish(part, world, summary_error is not None)
    remove_claims_folder(output_dir)
    if error is not None:
        raise error
    if other_errors:
        raise _OtherRankCrash(f"another rank stopped on an unexpected error (see its log); {NOT_WRITTEN}")
    if setup_errors:
        raise OtherRankError(f"another rank stopped on a whole-run error (see its message); {NOT_WRITTEN}")
    if stopped is not None or summary_error is not None or stopped_anywhere or summary_failed:
        cause = stopped or summary_error or f"another rank could not write to --output {output_dir}"
        raise OutputFolderError(
            f"{cause}. The run stopped: the outputs completed so far are kept (a rerun skips them); no summary was "
            "written."
        )
    if rank == 0:
        logger.info(f"summary written to {summary}")
    return 1 if failed else 0


NOT_WRITTEN = (
    "this rank stopped too: the outputs completed so far are kept (a rerun skips them); no summary was written"
)


def _is_setup_error(error: BaseException) -> bool:
    """Whether ``error`` is a whole-run error that the command line reports with exit status 2."""
    return isinstance(error, (ValueError, FileNotFoundError, FileExistsError))


def _gather(failed: int, stopped: bool, error: BaseException | None, world: int) -> tuple[int, bool, int, int]:
    """Failures summed, output-folder stops or-ed, and this rank's error counted (whole-run errors and others apart)
    over the ranks; also the point where every rank has finished its shard, or stopped. Returns the failures, whether
    a rank stopped on the output folder, and how many ranks stopped on a whole-run error or on another error."""
    setup, other = (error is not None and _is_setup_error(error)), (error is not None and not _is_setup_error(error))
    if world == 1:
        return failed, stopped, int(setup), int(other)
    total = torch.tensor([failed, int(stopped), int(setup), int(other)])
    dist.all_reduce(total)
    return int(total[0]), bool(total[1]), int(total[2]), int(total[3])


def _finish(part: _SummaryPart | None, world: int, summary_failed: bool) -> bool:
    """Drop this process's summary part once the summary is written (each rank keeps its part locked until then);
    whether rank 0 failed to write the summary."""
    if world > 1:
        flag = torch.tensor([int(summary_failed)])
        dist.all_reduce(flag)  # (also waits for rank 0 to have merged the parts)
        summary_failed = bool(flag[0])
    if part is not None:
        part.close(remove=True)
    if world > 1:
        dist.destroy_process_group()
    return summary_failed
