"""``python -m monai_qsa infer`` accounts for every entry of the input folder and names every failure: colliding
output names, symlinks and odd entries, root causes of unreadable images, an output folder that is read-only or
fills up, concurrent runs into one folder. Real bundles (freshly initialised sa_seg3d), real files and real
processes; the file systems for the output-folder tests are real tmpfs mounts (skipped, saying why, where mounting
is not permitted)."""

import contextlib
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
from test_inference import finished, infer_cli, summary_rows, volume

from monai_qsa.data.folders import scan_inputs
from monai_qsa.inference.bundle_runner import MAX_IMAGE_VOXELS
from monai_qsa.inference.inputs import assign_outputs


@pytest.fixture
def bundle(tmp_path, untrained_bundle) -> Path:
    return untrained_bundle("sa_seg3d", tmp_path / "bundle")


def save(path: Path, array: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def save_with_raw_affine(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI whose sform is ``affine`` as given (nibabel refuses to build images from singular affines)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(array, None, header), path)


def test_scan_lists_every_entry_with_a_reason(tmp_path):
    folder = tmp_path / "in"
    save(folder / "good.nii.gz", volume((8, 8, 8)))
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.nii.gz").write_bytes(b"")
    (folder / "folder.nii.gz").mkdir()
    (folder / "sub").mkdir()
    save(folder / "sub" / "deep.nii.gz", volume((8, 8, 8)))
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop through a symlink
    (folder / "dangling.nii.gz").symlink_to(folder / "missing.nii.gz")
    (folder / "self.nii.gz").symlink_to("self.nii.gz")
    (folder / "link.nii.gz").symlink_to(folder / "good.nii.gz")
    os.mkfifo(folder / "pipe.nii.gz")
    (folder / "scan.mhd").write_text("ObjectType = Image\n")
    (folder / "scan.raw").write_bytes(b"\0")

    flat = {e.path.relative_to(folder).as_posix(): (e.status, e.reason) for e in scan_inputs(folder, recursive=False)}
    assert set(flat) == {p.name for p in folder.iterdir()}  # every entry, hidden ones and broken links included
    assert flat["good.nii.gz"] == flat["link.nii.gz"] == flat["notes.txt"] == flat["scan.mhd"] == ("", "")
    assert flat[".hidden.nii.gz"][0] == "ignored" and "hidden" in flat[".hidden.nii.gz"][1]
    assert flat["sub"] == ("ignored", "sub-folder (use --recursive to process it)")
    assert flat["folder.nii.gz"] == ("failed", "a folder named like an image, not an image file")
    assert flat["dangling.nii.gz"][0] == "failed" and "dangling symlink" in flat["dangling.nii.gz"][1]
    assert flat["self.nii.gz"][0] == "failed" and "symlink loop" in flat["self.nii.gz"][1]
    assert flat["pipe.nii.gz"][0] == "failed" and "not a regular file" in flat["pipe.nii.gz"][1]
    assert flat["scan.raw"][0] == "ignored" and "detached header" in flat["scan.raw"][1]

    deep = {e.path.relative_to(folder).as_posix(): (e.status, e.reason) for e in scan_inputs(folder, recursive=True)}
    assert deep["sub/deep.nii.gz"] == ("", "")
    assert deep["sub/up"][0] == "failed" and "symlink loop" in deep["sub/up"][1]
    assert "sub" not in deep  # a plain folder is walked, not listed


def test_colliding_outputs_get_distinct_names(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    files = [inputs / "case.nii", inputs / "case.nii.gz", inputs / "Case.mha", inputs / "other.nii.gz"]
    targets = assign_outputs(files, inputs, outputs)
    assert len(set(targets.values())) == len(files)
    assert targets[inputs / "case.nii"].name == "case_nii_seg.nii.gz"
    assert targets[inputs / "case.nii.gz"].name == "case_nii_gz_seg.nii.gz"
    assert targets[inputs / "Case.mha"].name == "Case_mha_seg.nii.gz"  # case-insensitive file systems
    assert targets[inputs / "other.nii.gz"].name == "other_seg.nii.gz"
    with pytest.raises(ValueError, match="case_nii_gz.nii"):  # renaming cannot separate these: refused, listed
        assign_outputs([inputs / "case.nii", inputs / "case.nii.gz", inputs / "case_nii_gz.nii"], inputs, outputs)


def test_every_input_is_processed_or_reported_with_its_root_cause(bundle, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    save(inputs / "case.nii", volume((24, 24, 20), 1))
    save(inputs / "case.nii.gz", volume((20, 24, 24), 2))
    save(inputs / "a" / "same.nii.gz", volume((20, 20, 20), 3))
    save(inputs / "b" / "same.nii.gz", volume((22, 20, 20), 4))
    patched = volume((24, 24, 20), 5)
    patched[2:12, 2:12, 10] = np.nan
    save(inputs / "nan_patch.nii.gz", patched)
    save(inputs / "one_voxel.nii.gz", np.ones((1, 1, 1), np.float32))
    save_with_raw_affine(inputs / "zero_affine.nii.gz", volume((20, 20, 20)), np.zeros((4, 4)))
    singular = np.eye(4)
    singular[2, :3] = singular[0, :3]
    save_with_raw_affine(inputs / "singular_affine.nii.gz", volume((20, 20, 20)), singular)
    whole = gzip.compress((inputs / "case.nii").read_bytes())
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30))
    header.set_data_dtype(np.float32)
    (inputs / "huge.nii").write_bytes(header.binaryblock + b"\0" * 1024)
    (inputs / "huge.mha").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 10\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    (inputs / "folder.nii.gz").mkdir()
    (inputs / "dangling.nii.gz").symlink_to(inputs / "gone.nii.gz")
    (inputs / "loop.nii.gz").symlink_to("loop.nii.gz")
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    outputs.mkdir()
    (outputs / "case_seg.nii.gz").write_bytes(b"from a run before case.nii.gz was added")

    code, log = finished(
        infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs), "--recursive")
    )
    assert code == 1, log
    assert "Traceback" not in log, log
    rows = {Path(r["file"]).relative_to(inputs).as_posix(): r for r in summary_rows(outputs)}
    entries = {p.relative_to(inputs).as_posix() for p in inputs.rglob("*") if p.is_file() or p.is_symlink()}
    assert set(rows) == entries | {"folder.nii.gz"}  # every file and link, and the folder named like an image
    ok = {  # input -> output: colliding names get distinct outputs; same names in two sub-folders stay apart
        "case.nii": "case_nii_seg.nii.gz",
        "case.nii.gz": "case_nii_gz_seg.nii.gz",
        "a/same.nii.gz": "a/same_seg.nii.gz",
        "b/same.nii.gz": "b/same_seg.nii.gz",
        "nan_patch.nii.gz": "nan_patch_seg.nii.gz",
    }
    for name, output in ok.items():
        assert rows[name]["status"] == "ok" and rows[name]["output"] == str(outputs / output), rows[name]
        assert nib.load(outputs / output).shape == nib.load(inputs / name).shape
    assert "same name stem" in rows["case.nii"]["reason"] and "same name stem" in rows["case.nii.gz"]["reason"]
    orphan = f"{outputs / 'case_seg.nii.gz'} (an earlier run's, before the rename) is left in place"
    assert orphan in rows["case.nii"]["reason"] and orphan in rows["case.nii.gz"]["reason"]
    assert (outputs / "case_seg.nii.gz").read_bytes() == b"from a run before case.nii.gz was added"
    note = rows["nan_patch.nii.gz"]["reason"]
    assert "100 of 11520 voxels" in note and "replaced" in note
    expected_failures = {
        "one_voxel.nii.gz": "image too small",
        "zero_affine.nii.gz": "singular affine",
        "singular_affine.nii.gz": "singular affine",
        "truncated.nii.gz": "truncated file",
        "huge.nii": f"over the limit of {MAX_IMAGE_VOXELS:,} voxels",
        "huge.mha": f"over the limit of {MAX_IMAGE_VOXELS:,} voxels",
        "folder.nii.gz": "a folder named like an image",
        "dangling.nii.gz": "dangling symlink",
        "loop.nii.gz": "symlink loop",
    }
    for name, reason in expected_failures.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["reason"], rows[name]
        assert "object at 0x" not in rows[name]["reason"]
    assert {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()} == before  # inputs untouched


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at ``path`` for the duration of the block (the test is skipped, saying why, where
    mounting is not permitted)."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here ({mount.stderr.strip()}): run as root to test a real full or "
            "read-only output folder"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_output_is_refused_before_the_model_loads(bundle, tmp_path):
    inputs = tmp_path / "in"
    save(inputs / "case.nii.gz", volume((20, 20, 20)))
    (bundle / "models" / "model.pt").unlink()  # loading the model would fail: the check must come first
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(read_only)))
        assert code == 2, log
        assert f"--output {read_only} cannot be written: Read-only file system" in log
        assert "Traceback" not in log and "cannot load bundle" not in log, log


def test_full_output_folder_stops_cleanly_and_keeps_completed_outputs(bundle, tmp_path):
    inputs = tmp_path / "in"
    for index in range(6):
        save(inputs / f"case_{index}.nii.gz", volume((20, 20, 20), index))
    with tmpfs(tmp_path / "small", "size=256k") as small:
        outputs = small / "out"
        outputs.mkdir()
        stats = os.statvfs(small)
        page = stats.f_frsize
        (small / "filler").write_bytes(b"\0" * (stats.f_bavail * page - 5 * page))  # room for a few small files
        code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)))
        assert code == 2, log
        assert "No space left on device" in log and "Traceback" not in log, log
        written = sorted(outputs.glob("case_*_seg.nii.gz"))
        assert 1 <= len(written) < 6, log
        for path in written:
            assert nib.load(path).get_fdata().shape == (20, 20, 20)  # completed outputs are whole
        assert sorted(p.name for p in outputs.iterdir()) == sorted(p.name for p in written)  # no summary, part, claim

        (small / "filler").unlink()  # space again: the rerun finishes the job, skipping what was done
        code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)))
        assert code == 0, log
        rows = summary_rows(outputs)
        assert sorted(Path(r["output"]).name for r in rows if r["status"] == "skipped") == [p.name for p in written]
        assert len(list(outputs.glob("case_*_seg.nii.gz"))) == 6


def test_concurrent_runs_into_one_folder_compute_each_case_once(bundle, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    names = [f"case_{index}.nii.gz" for index in range(6)]
    for index, name in enumerate(names):
        save(inputs / name, volume((24, 24, 24), index))
    runs = [infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)) for _ in range(2)]
    results = [finished(run) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    summaries = sorted(outputs.glob("inference_summary_*.csv"))
    assert len(summaries) == 2  # one per run, distinct names
    statuses = {name: [] for name in names}
    for summary in summaries:
        with open(summary, newline="") as f:
            for row in csv.DictReader(f):
                statuses[Path(row["file"]).name].append(row["status"])
    assert all(sorted(found) == ["ok", "skipped"] for found in statuses.values()), statuses  # computed exactly once
    assert sorted(p.name for p in outputs.iterdir() if not p.name.startswith("inference_summary_")) == sorted(
        name.replace(".nii.gz", "_seg.nii.gz") for name in names
    )  # no temporary file, claim or claims folder left


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    script = (
        "import sys, time; from pathlib import Path; from monai_qsa.inference.claims import CaseClaim\n"
        "claim = CaseClaim(Path(sys.argv[1]), 'case_seg.nii.gz'); assert claim.acquire(wait=False)\n"
        "print('claimed', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "claimed"
    from monai_qsa.inference.claims import CaseClaim

    claim = CaseClaim(tmp_path, "case_seg.nii.gz")
    assert not claim.acquire(wait=False)  # held by a live process
    assert f"pid {holder.pid}" in claim.holder()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert claim.path.exists()  # the killed holder left its claim file behind...
    deadline = time.time() + 10
    while not claim.acquire(wait=False) and time.time() < deadline:
        time.sleep(0.05)
    assert claim.holder().startswith(os.uname().nodename)  # ...and it is taken over at once
    claim.release()
    assert not claim.path.exists()


def test_small_and_truncated_2d_images_are_refused_with_the_reason(tmp_path, untrained_bundle):
    from monai_qsa.inference.bundle_runner import BundleRunner, CaseError

    runner = BundleRunner(untrained_bundle("sa_seg", tmp_path))
    save(tmp_path / "one_pixel.nii.gz", np.ones((1, 1), np.float32))
    with pytest.raises(CaseError, match=r"image too small: shape \(1, 1\)"):  # was an IndexError in the writer
        runner.run(tmp_path / "one_pixel.nii.gz")
    save(tmp_path / "slice.nii", volume((40, 30, 20))[..., 0])
    whole = (tmp_path / "slice.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(whole[: len(whole) - 100])
    cut = f"truncated file: its header states {len(whole):,} bytes, the file has {len(whole) - 100:,}"
    with pytest.raises(CaseError, match=cut):
        runner.run(tmp_path / "cut.nii")
    assert runner.run(tmp_path / "slice.nii").pred.shape[-2:] == (40, 30)


def test_partial_files_are_only_the_target_s_own(tmp_path):
    from monai_qsa.utils.files import atomic_write, partial_files

    own = tmp_path / ".partial.123.0123abcd.case1_seg.nii.gz"
    others = [
        ".partial.123.0123abcd.ct.case1_seg.nii.gz",  # a concurrent run's temporary file of ct.case1_seg.nii.gz
        ".partial.x.0123abcd.case1_seg.nii.gz",
        ".partial.123.0123ABCD.case1_seg.nii.gz",
        ".partial.123.0123abcd.case1_seg.nii.gz.bak",
        "case1_seg.nii.gz",
    ]
    for name in [own.name, *others]:
        (tmp_path / name).write_bytes(b"x")
    assert partial_files(tmp_path / "case1_seg.nii.gz") == [own]
    with atomic_write(tmp_path / "case1_seg.nii.gz") as partial:  # the names atomic_write makes match
        partial.write_bytes(b"y")
        assert partial in partial_files(tmp_path / "case1_seg.nii.gz")
    assert partial_files(tmp_path / "missing" / "x.nii.gz") == []


def test_planted_symlinks_in_the_claims_folder_are_refused(tmp_path):
    from monai_qsa.inference.claims import CLAIMS_FOLDER, CaseClaim, ClaimsFolderError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "out"
    output.mkdir()
    claim = CaseClaim(output, "case_seg.nii.gz")
    (output / CLAIMS_FOLDER).mkdir()
    claim.path.symlink_to(victim)  # a claim file planted as a symlink
    with pytest.raises(ClaimsFolderError, match="symlink"):
        claim.acquire(wait=False)
    assert victim.read_text() == "precious"

    claim.path.unlink()
    (output / CLAIMS_FOLDER).rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (output / CLAIMS_FOLDER).symlink_to(elsewhere)  # the claims folder planted as a symlink
    with pytest.raises(ClaimsFolderError, match="symlink or not a folder"):
        claim.acquire(wait=False)
    assert list(elsewhere.iterdir()) == []

    (output / CLAIMS_FOLDER).unlink()
    assert claim.acquire(wait=False)  # a folder of its own is created, private to its user
    assert (output / CLAIMS_FOLDER).stat().st_mode & 0o077 == 0
    claim.release()


def test_claims_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    from monai_qsa.inference import claims

    monkeypatch.setattr(claims.os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(claims.ClaimsFolderError, match="owned by another user"):
        claims.CaseClaim(tmp_path, "case").acquire(wait=False)


def test_a_device_is_validated_never_evaluated(bundle, tmp_path):
    from monai_qsa.inference.bundle_runner import BundleRunner

    marker = tmp_path / "injected"
    evil = f"cpu'); import os; os.system('touch {marker}') #"
    with pytest.raises(ValueError, match="is not a torch device"):
        BundleRunner(bundle, device=evil)
    inputs = tmp_path / "in"
    save(inputs / "case.nii.gz", volume((20, 20, 20)))
    code, log = finished(
        infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "out"), "--device", evil)
    )
    assert code == 2 and "is not a torch device" in log and "Traceback" not in log, log
    assert not marker.exists()
    assert BundleRunner(bundle, device="cpu").device.type == "cpu"  # an ordinary device still works


def test_foreign_probabilities_csv_is_refused_before_processing(tmp_path, untrained_bundle):
    bundle = untrained_bundle("sa_cls", tmp_path / "bundle")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    save(inputs / "case.nii.gz", np.ones((20, 20), np.float32))
    outputs.mkdir()
    foreign = outputs / "probabilities.csv"
    foreign.write_text("image,score\nx.nii.gz,0.5\n")
    code, log = finished(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs)))
    assert code == 2 and str(foreign) in log and "Traceback" not in log, log
    assert foreign.read_text() == "image,score\nx.nii.gz,0.5\n"
    assert not list(outputs.glob("inference_summary_*"))


def test_classified_files_are_read_as_complete_utf8_records(tmp_path):
    from monai_qsa.inference.batch import ProbabilitiesFileError, _ClassifiedFiles

    columns = ("file", "p_a", "p_b")
    path = tmp_path / "probabilities.csv"
    classified = _ClassifiedFiles(path, columns)
    assert "x" not in classified  # no file yet
    path.write_bytes('file,p_a,p_b\r\n/in/é.nii.gz,0.5,0.5\r\n"/in/new\nline.nii.gz",0.1,0.9\r\n"/in/cut'.encode())
    assert "/in/é.nii.gz" in classified and "/in/new\nline.nii.gz" in classified
    assert not any("cut" in name for name in classified.files)  # a record being appended is read next time
    with open(path, "ab") as f:
        f.write(' ñ.nii.gz",0.3,0.7\r\n'.encode())
    assert "/in/cut ñ.nii.gz" in classified
    path.write_text("image,score\nx,1\n")
    with pytest.raises(ProbabilitiesFileError, match=str(path)):
        _ClassifiedFiles(path, columns).refresh()


def test_stale_summary_parts_and_their_temporary_files_are_removed(tmp_path):
    import fcntl

    from monai_qsa.inference.batch import _SummaryPart

    stale = [
        tmp_path / ".inference_summary_1.rank0.partial.csv",
        tmp_path / ".inference_summary_1.rank1.partial.csv.creating",
        tmp_path / ".partial.99.0123abcd..inference_summary_1.rank2.partial.csv",
    ]
    for path in stale:
        path.write_text("file\n")
    live = _SummaryPart(tmp_path / ".inference_summary_2.rank0.partial.csv")
    kept = tmp_path / "inference_summary_0.csv"
    kept.write_text("file\n")
    _SummaryPart.remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.path.name, kept.name])
    with open(live.path) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # created locked
    live.close(remove=True)


def test_energy_meter_close_stops_the_tracker():
    import threading

    from monai_qsa.utils.energy import EnergyMeter

    before = set(threading.enumerate())
    meter = EnergyMeter(measure_power_secs=0.1)
    meter.start()  # a phase left running, as when a case raises
    meter.close()
    meter.close()  # twice is harmless

    def new_threads() -> list:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    deadline = time.monotonic() + 20  # a sampling callback already running finishes first (slow on a loaded machine)
    while new_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert new_threads() == []
    assert meter.stop() is None


def test_energy_meter_close_stops_a_sampler_rearmed_during_the_trackers_stop():
    """The race itself, made certain: a sampling callback under way when the tracker's ``stop`` lands re-arms its
    timer after it (and the tracker has dropped its scheduler by then); ``close`` still stops it."""
    from monai_qsa.utils.energy import EnergyMeter

    meter = EnergyMeter(measure_power_secs=0.1)
    meter.start()
    tracker = meter._tracker
    scheduler, stop = tracker._scheduler, tracker.stop

    def stop_then_rearm():
        result = stop()
        scheduler.start(from_run=True)  # the callback under way re-arms now
        return result

    tracker.stop = stop_then_rearm
    meter.close()
    time.sleep(0.3)
    assert not scheduler._timer.is_alive()


def test_a_rank_that_fails_stops_every_rank_with_the_same_status(bundle, tmp_path):
    import socket

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    save(inputs / "a.nii.gz", volume((20, 20, 20)))
    save(inputs / "b.nii.gz", volume((20, 20, 20), 1))
    outputs.mkdir()
    (outputs / "b_seg.nii.gz").write_bytes(b"done")  # rank 1's only case is done: it never loads the model
    (bundle / "models" / "model.pt").unlink()  # rank 0 cannot load it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(infer_cli("--bundle", str(bundle), "--input", str(inputs), "--output", str(outputs), env=env))
    results = [finished(process, timeout=180) for process in ranks]  # before the fix, rank 1 waited for ever
    assert [code for code, _ in results] == [2, 2], results
    assert "cannot load bundle" in results[0][1]
    assert "another rank stopped on a whole-run error" in results[1][1]
    assert sorted(p.name for p in outputs.iterdir()) == ["b_seg.nii.gz"]  # no summary, part or claim left
