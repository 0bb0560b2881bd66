import csv
import logging
import math
import socket

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from monai_qsa.handlers import EnergyHandler
from monai_qsa.handlers.energy import CSV_COLUMNS, PROCESS_RUN_ID
from monai_qsa.utils.csv_rows import append_csv_row
from monai_qsa.utils.energy import measure_energy


def _loader(n: int, batch_size: int = 4) -> DataLoader:
    data = [{"image": torch.randn(1, 16, 16), "label": torch.randint(0, 2, (1,)).float()} for _ in range(n)]
    return DataLoader(Dataset(data), batch_size=batch_size)


def _run_tracked(tmp_path, epochs: int = 2, run_id: str | None = None):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 1),
    )
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_loader(6), network=net)
    EnergyHandler(output_dir=tmp_path, phase="validate", run_id=run_id).attach(evaluator)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=_loader(10),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=torch.nn.BCEWithLogitsLoss(),
    )
    EnergyHandler(output_dir=tmp_path, phase="train", run_id=run_id).attach(trainer)
    ValidationHandler(interval=1, validator=evaluator).attach(trainer)
    trainer.run()
    return trainer, evaluator


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_trainer_and_evaluator_tracked(tmp_path):
    trainer, evaluator = _run_tracked(tmp_path)
    for engine, samples in ((trainer, 10), (evaluator, 6)):
        metrics = engine.state.metrics
        assert metrics["energy_epoch_kwh"] > 0 and metrics["energy_epoch_duration_s"] > 0
        assert metrics["energy_epoch_emissions_kg"] > 0
        assert math.isclose(
            metrics["energy_epoch_j_per_sample"], metrics["energy_epoch_kwh"] * 3.6e6 / samples, rel_tol=1e-9
        )
        reading = engine.state.energy["epoch"]
        assert reading.samples == samples
        assert math.isclose(reading.energy_kwh, reading.cpu_kwh + reading.ram_kwh + reading.gpu_kwh, rel_tol=1e-6)
    rows = _rows(tmp_path / "energy.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    train_epochs = [r for r in rows if r["phase"] == "train" and r["scope"] == "epoch"]
    val_epochs = [r for r in rows if r["phase"] == "validate" and r["scope"] == "epoch"]
    train_run = [r for r in rows if r["phase"] == "train" and r["scope"] == "run"]
    assert [r["epoch"] for r in train_epochs] == ["1", "2"] and len(val_epochs) == 2 and len(train_run) == 1
    assert math.isclose(
        float(train_run[0]["energy_kwh"]), sum(float(r["energy_kwh"]) for r in train_epochs), rel_tol=1e-6
    )
    assert int(train_run[0]["samples"]) == 20
    assert all("CPU:" in r["method"] and "RAM:" in r["method"] for r in rows)
    assert {r["run_id"] for r in rows} == {PROCESS_RUN_ID}  # train and validate rows of one run share its id

    # a second run appends to the same CSV, never truncates it, and its rows can be told apart
    _run_tracked(tmp_path, epochs=1, run_id="second")
    appended = _rows(tmp_path / "energy.csv")[len(rows) :]
    assert len(appended) == 4 and {r["run_id"] for r in appended} == {"second"}


def test_no_network_traffic(tmp_path, monkeypatch):
    destinations = []
    real_connect = socket.socket.connect

    def recording_connect(self, address):
        destinations.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: destinations.append(address) or 111)
    monkeypatch.setattr(
        socket,
        "create_connection",
        lambda address, *a, **k: destinations.append(address) or (_ for _ in ()).throw(OSError("blocked")),
    )
    _run_tracked(tmp_path, epochs=1)
    with measure_energy(samples=1) as energy:
        torch.randn(200, 200) @ torch.randn(200, 200)
    assert energy.reading is not None and energy.reading.energy_kwh > 0
    remote = [a for a in destinations if not (isinstance(a, tuple) and str(a[0]) in ("127.0.0.1", "::1", "localhost"))]
    remote = [a for a in remote if not isinstance(a, (str, bytes))]  # unix sockets are local
    assert not remote, f"connections left the machine: {remote}"


@pytest.mark.parametrize("method", ["start_task", "stop_task"])
def test_codecarbon_failure_does_not_stop_training(tmp_path, monkeypatch, caplog, method):
    import codecarbon

    def broken(self, *args, **kwargs):
        raise RuntimeError("sensor exploded")

    monkeypatch.setattr(codecarbon.OfflineEmissionsTracker, method, broken)
    with caplog.at_level(logging.WARNING):
        trainer, _ = _run_tracked(tmp_path, epochs=2)
    assert trainer.state.epoch == 2 and trainer.state.iteration == 6
    warnings = [r for r in caplog.records if "energy measurement disabled" in r.getMessage()]
    assert len(warnings) == 2  # one per handler (trainer, evaluator), not one per epoch
    assert "sensor exploded" in warnings[0].getMessage()
    assert "energy_epoch_kwh" not in trainer.state.metrics


def test_mismatched_csv_is_refused_and_kept(tmp_path):
    path = tmp_path / "energy.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="energy.csv"):
        EnergyHandler(output_dir=tmp_path).attach(
            SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_loader(2), network=torch.nn.Identity())
        )
    assert path.read_text() == "a,b\n1,2\n"


def test_cut_last_line_is_kept_and_new_rows_start_on_a_new_line(tmp_path, caplog):
    _run_tracked(tmp_path, epochs=1, run_id="killed")
    path = tmp_path / "energy.csv"
    complete = _rows(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 40])  # the last row lost its tail, as if the writer was killed
    with caplog.at_level(logging.WARNING):
        _run_tracked(tmp_path, epochs=1, run_id="next")
    rows = _rows(path)
    assert [r["run_id"] for r in rows[: len(complete) - 1]] == ["killed"] * (len(complete) - 1)
    cut = rows[len(complete) - 1]
    assert cut["timestamp"] == complete[-1]["timestamp"] and cut["run_id"] is None  # kept, not glued to the next row
    assert len(rows) == len(complete) + 4 and all(r["run_id"] == "next" and r["method"] for r in rows[len(complete) :])
    warnings = [r.getMessage() for r in caplog.records if "last line is incomplete" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_row_terminator_cut_in_half_needs_no_repair(tmp_path, caplog):
    path = tmp_path / "rows.csv"
    append_csv_row(path, {"a": 1, "b": 2}, ("a", "b"))
    path.write_bytes(path.read_bytes()[:-1])  # "\r" written, "\n" lost
    with caplog.at_level(logging.WARNING):
        append_csv_row(path, {"a": 3, "b": 4}, ("a", "b"))
    assert path.read_bytes() == b"a,b\r\n1,2\r\n3,4\r\n" and not caplog.records


def test_csv_of_an_earlier_version_gains_run_id_and_keeps_its_rows(tmp_path, caplog):
    path = tmp_path / "energy.csv"
    old_columns = ",".join(CSV_COLUMNS[:-1])
    old_rows = "2026-01-01T00:00:00+00:00,train,epoch,1,4,1.0,1e-06,1e-06,0,0,1e-07,0.9,10.0,2.0,CPU: old\r\n" * 2
    path.write_bytes(f"{old_columns}\r\n{old_rows}".encode())
    with caplog.at_level(logging.WARNING):
        _run_tracked(tmp_path, epochs=1, run_id="new")
    content = path.read_bytes()
    assert content.startswith(f"{','.join(CSV_COLUMNS)}\r\n{old_rows}".encode())  # old rows byte for byte
    rows = _rows(path)
    assert [r["method"] for r in rows[:2]] == ["CPU: old"] * 2 and rows[0]["run_id"] is None
    assert len(rows) == 6 and {r["run_id"] for r in rows[2:]} == {"new"}
    messages = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert len(messages) == 1 and "run_id" in messages[0] and str(path) in messages[0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("constant", "constant estimate (half of TDP 100 W)"), ("cpu_load", "cpu_load estimate (load x TDP 100 W)")],
)
def test_method_names_how_the_cpu_figure_was_obtained(tmp_path, mode, expected):
    from codecarbon.external.hardware import CPU

    from monai_qsa.utils.energy import _describe_cpu

    assert (
        _describe_cpu(CPU.from_utils(output_dir=str(tmp_path), mode=mode, model="Some CPU", tdp=100))
        == f"CPU: CodeCarbon {expected}"
    )


def test_row_waiting_for_the_lock_lands_in_the_file_that_replaced_the_locked_one(tmp_path):
    import fcntl
    import os
    import threading
    import time

    path = tmp_path / "rows.csv"
    path.write_bytes(b"a,b\r\n1,2\r\n")
    with open(path, "rb") as old:
        fcntl.flock(old, fcntl.LOCK_EX)  # as extend_csv_columns holds it while replacing the file
        writer = threading.Thread(target=append_csv_row, args=(path, {"a": 3, "b": 4}, ("a", "b")))
        writer.start()
        time.sleep(0.3)  # the writer opens the old file and waits for the lock
        replacement = tmp_path / "replacement.csv"
        replacement.write_bytes(b"a,b\r\n1,2\r\n")
        os.replace(replacement, path)
    writer.join(timeout=10)
    assert path.read_bytes() == b"a,b\r\n1,2\r\n3,4\r\n"
