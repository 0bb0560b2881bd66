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
from monai_qsa.handlers.energy import CSV_COLUMNS
from monai_qsa.utils.energy import measure_energy


def _loader(n: int, batch_size: int = 4) -> DataLoader:
    data = [{"image": torch.randn(1, 16, 16), "label": torch.randint(0, 2, (1,)).float()} for _ in range(n)]
    return DataLoader(Dataset(data), batch_size=batch_size)


def _run_tracked(tmp_path, epochs: int = 2):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_loader(6), network=net)
    EnergyHandler(output_dir=tmp_path, phase="validate").attach(evaluator)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=_loader(10),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=torch.nn.BCEWithLogitsLoss(),
    )
    EnergyHandler(output_dir=tmp_path, phase="train").attach(trainer)
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
        assert math.isclose(metrics["energy_epoch_j_per_sample"], metrics["energy_epoch_kwh"] * 3.6e6 / samples, rel_tol=1e-9)
        reading = engine.state.energy["epoch"]
        assert reading.samples == samples
        assert math.isclose(reading.energy_kwh, reading.cpu_kwh + reading.ram_kwh + reading.gpu_kwh, rel_tol=1e-6)
    rows = _rows(tmp_path / "energy.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    train_epochs = [r for r in rows if r["phase"] == "train" and r["scope"] == "epoch"]
    val_epochs = [r for r in rows if r["phase"] == "validate" and r["scope"] == "epoch"]
    train_run = [r for r in rows if r["phase"] == "train" and r["scope"] == "run"]
    assert [r["epoch"] for r in train_epochs] == ["1", "2"] and len(val_epochs) == 2 and len(train_run) == 1
    assert math.isclose(float(train_run[0]["energy_kwh"]), sum(float(r["energy_kwh"]) for r in train_epochs), rel_tol=1e-6)
    assert int(train_run[0]["samples"]) == 20
    assert all("CPU:" in r["method"] and "RAM:" in r["method"] for r in rows)

    # a second run appends to the same CSV, never truncates it
    _run_tracked(tmp_path, epochs=1)
    assert len(_rows(tmp_path / "energy.csv")) == len(rows) + 4


def test_no_network_traffic(tmp_path, monkeypatch):
    destinations = []
    real_connect = socket.socket.connect

    def recording_connect(self, address):
        destinations.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: destinations.append(address) or 111)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: destinations.append(address) or (_ for _ in ()).throw(OSError("blocked")))
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
        EnergyHandler(output_dir=tmp_path).attach(SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_loader(2), network=torch.nn.Identity()))
    assert path.read_text() == "a,b\n1,2\n"
