import json
import logging

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, MeanDice, ValidationHandler, from_engine
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose

from monai_qsa.handlers import PostTrainingQuantizationHandler
from monai_qsa.networks import SAUNet
from monai_qsa.quantization import QuantizationFailedError, load_quantized, quantize_and_check
from monai_qsa.quantization.check import calibration_patches, higher_is_better
from monai_qsa.utils.compile import CompiledForCPU, has_cpp_compiler


def _squares(count: int, seed: int) -> list[dict]:
    """2D images with one bright square each at a random place, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(count):
        label = torch.zeros(1, 24, 24)
        y, x = torch.randint(2, 12, (2,), generator=generator).tolist()
        label[:, y : y + 9, x : x + 9] = 1
        cases.append({"image": label + 0.3 * torch.randn(label.shape, generator=generator), "label": label})
    return cases


def _workflow(
    tmp_path, handler_kwargs: dict
) -> tuple[SupervisedTrainer, SupervisedEvaluator, PostTrainingQuantizationHandler]:
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3)
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    key_metric = {"val_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(_squares(8, seed=1), batch_size=4),
        network=net,
        inferer=SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=4, overlap=0.25),
        postprocessing=post,
        key_val_metric=key_metric,
        val_handlers=[
            CheckpointSaver(str(tmp_path), {"network": net}, save_key_metric=True, key_metric_filename="model.pt")
        ],
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=6,
        train_data_loader=DataLoader(_squares(32, seed=0), batch_size=8, shuffle=True),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2),
        loss_function=lambda logits, label: torch.nn.functional.cross_entropy(logits, label[:, 0].long()),
        train_handlers=[ValidationHandler(validator=evaluator, interval=2)],
    )
    handler = PostTrainingQuantizationHandler(
        evaluator=evaluator,
        key_metric=key_metric,
        postprocessing=post,
        **({"output_dir": tmp_path, "checkpoint": tmp_path / "model.pt"} | handler_kwargs),
    )
    handler.attach(trainer)
    return trainer, evaluator, handler


def test_handler_writes_accepted_int8_model_and_report(tmp_path):
    # default calibration budget (32 network inputs): all 4 windows of the 8 validation cases
    trainer, evaluator, _ = _workflow(tmp_path, {"latency_repeats": 3, "max_metric_drop": 0.02})
    trainer.run()

    report = json.loads((tmp_path / "quantization_report.json").read_text())
    # the best checkpoint was quantised; its fp32 metric is the validation of the same weights, not evaluated again
    assert report["fp32_metric"] == pytest.approx(evaluator.state.best_metric, abs=1e-6)
    assert report["fp32_metric_source"] == f"validation at epoch {evaluator.state.best_metric_epoch}"
    assert "fp32_evaluation" not in report["seconds"] and report["seconds"]["int8_evaluation"] > 0
    assert report["calibration_patches"] == 32 and report["input_shape"] == [1, 16, 16]
    assert report["fp32_metric"] > 0.8
    assert report["accepted"] and abs(report["metric_drop"]) <= 0.02
    assert report["artifact"] == str(tmp_path / "model_int8.pt2")
    assert report["int8_bytes"] == (tmp_path / "model_int8.pt2").stat().st_size
    assert report["parameters"] == sum(p.numel() for p in trainer.network.parameters())
    assert report["flops"] > 0 and report["latency"]["fp32_ms"] > 0 and report["latency"]["int8_ms"] > 0
    assert len(report["latency"]["int8_runs_ms"]) == 3
    assert trainer.state.metrics["int8_metric"] == report["int8_metric"]
    assert trainer.state.metrics["int8_accepted"] == 1.0
    # the extra evaluations did not run the evaluator's own handlers (its checkpoint saver wrote one file)
    assert [p.name for p in tmp_path.glob("*.pt")] == ["model.pt"]

    model = load_quantized(tmp_path / "model_int8.pt2")
    image = torch.zeros(1, 1, 40, 32)
    image[..., 10:22, 8:20] = 1
    with torch.no_grad():
        pred = SlidingWindowInferer(roi_size=(16, 16), overlap=0.25)(image, model).argmax(1)
    assert pred.shape == (1, 40, 32)
    assert pred[0, 12:20, 10:18].float().mean() > 0.9 and pred[0, 30:, :].float().mean() < 0.1


def test_handler_refuses_broken_calibration(tmp_path):
    deployable = tmp_path / "model_int8.pt2"
    deployable.write_bytes(b"int8 model of an earlier run")
    blank = [{"image": torch.zeros(4, 1, 24, 24)}]  # ranges calibrated on nothing: int8 activations saturate
    trainer, _, handler = _workflow(tmp_path, {"calibration_loader": blank, "compile": False, "latency_repeats": 0})
    trainer.run()

    report = json.loads((tmp_path / "quantization_report.json").read_text())
    assert not report["accepted"] and report["metric_drop"] > 0.01
    assert report["latency"] is None and "int8_latency_ms" not in trainer.state.metrics  # timing turned off
    assert "not deployed" in report["reason"] and report["artifact"] is None
    assert not deployable.exists()  # a stale int8 model of an earlier run is not left to be deployed
    assert (tmp_path / "model_int8.rejected.pt2").is_file()
    assert trainer.state.metrics["int8_accepted"] == 0.0
    assert trainer.state.epoch == 6  # the run still ended cleanly


def test_handler_failure_is_reported_and_the_run_ends(tmp_path):
    no_images = [{"img": torch.zeros(2, 1, 24, 24)}]  # wrong key: calibration cannot find the input
    trainer, _, _ = _workflow(tmp_path, {"calibration_loader": no_images, "compile": False})
    trainer.run()
    report = json.loads((tmp_path / "quantization_report.json").read_text())
    assert not report["accepted"] and "'image'" in report["error"]
    assert trainer.state.epoch == 6 and (tmp_path / "model.pt").is_file() and not (tmp_path / "model_int8.pt2").exists()


def test_unwritable_output_dir_is_logged_and_the_run_ends(tmp_path, caplog):
    not_a_folder = tmp_path / "not_a_folder"
    not_a_folder.write_text("")
    no_images = [{"img": torch.zeros(2, 1, 24, 24)}]  # the int8 step fails, and its report cannot be written
    trainer, _, handler = _workflow(
        tmp_path, {"calibration_loader": no_images, "compile": False, "output_dir": not_a_folder}
    )
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert trainer.state.epoch == 6 and trainer.state.metrics["int8_accepted"] == 0.0
    assert "'image'" in handler.report.error
    assert f"report {not_a_folder / 'quantization_report.json'} could not be written" in caplog.text

    # a failure before quantisation starts (a damaged checkpoint), with the same unwritable folder
    caplog.clear()
    handler.checkpoint = tmp_path / "damaged.pt"
    handler.checkpoint.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.INFO):
        handler(trainer)
    assert "could not start" in caplog.text and "could not be written" in caplog.text
    assert handler.report.error is not None and trainer.state.metrics["int8_accepted"] == 0.0


class _Unreadable:
    def __iter__(self):
        raise RuntimeError("calibration data cannot be read")


def _tiny_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()


def test_failed_step_withdraws_a_deployable_file_of_an_earlier_run(tmp_path):
    deployable = tmp_path / "model_int8.pt2"
    deployable.write_bytes(b"int8 model of an earlier run")
    with pytest.raises(QuantizationFailedError, match="cannot be read") as failure:
        quantize_and_check(_tiny_network(), lambda network: 1.0, _Unreadable(), tmp_path, compile=False)
    assert not deployable.exists()
    report = json.loads((tmp_path / "quantization_report.json").read_text())
    assert report == failure.value.report.to_dict() and "cannot be read" in report["error"] and not report["accepted"]


def test_accepted_model_whose_save_fails_leaves_no_deployable_file(tmp_path, monkeypatch):
    def failing_save(path, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("monai_qsa.quantization.check.save_quantized", failing_save)
    deployable = tmp_path / "model_int8.pt2"
    deployable.write_bytes(b"int8 model of an earlier run")
    images = [torch.rand(2, 1, 8, 8)]
    with pytest.raises(QuantizationFailedError, match="disk full") as failure:
        quantize_and_check(_tiny_network(), lambda network: 1.0, images, tmp_path, compile=False, latency_repeats=0)
    assert not deployable.exists() and failure.value.report.artifact is None
    report = json.loads((tmp_path / "quantization_report.json").read_text())
    assert report["metric_drop"] == 0.0 and not report["accepted"] and "disk full" in report["error"]

    # an accepted x86_eager model cannot be saved: an earlier run's deployable file is withdrawn as well
    deployable.write_bytes(b"int8 model of an earlier run")
    eager = quantize_and_check(
        _tiny_network(), lambda network: 1.0, images, tmp_path, backend="x86_eager", compile=False, latency_repeats=0
    )
    assert eager.accepted and eager.artifact is None and not deployable.exists()


def test_handler_needs_evaluator_on_trainer(tmp_path):
    trainer, evaluator, handler = _workflow(tmp_path, {})
    with pytest.raises(ValueError, match="evaluator="):
        PostTrainingQuantizationHandler(key_metric=handler.key_metric, output_dir=tmp_path).attach(trainer)
    with pytest.raises(ValueError, match="key_metric="):
        PostTrainingQuantizationHandler(evaluator=evaluator)
    with pytest.raises(ValueError, match="max_metric_drop"):
        PostTrainingQuantizationHandler(key_metric=handler.key_metric, max_metric_drop=-1)


def test_lower_is_better_metric_without_ignite(tmp_path):
    """quantize_and_check on its own, with a metric where lower is better (mean absolute error of the foreground
    probability): a calibration on blank images makes int8 worse, so it is rejected; fp32 is evaluated once."""
    torch.manual_seed(0)
    net = SAUNet(2, 1, 2, features=(8, 16), num_heads=2, kernel_size=3)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    cases = _squares(16, seed=0)
    images, labels = torch.stack([c["image"] for c in cases]), torch.stack([c["label"] for c in cases])
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), labels[:, 0].long()).backward()
        optimizer.step()
    net.eval()
    calls = []

    def mean_absolute_error(network):
        calls.append(network)
        with torch.no_grad():
            return float((network(images).softmax(1)[:, 1:] - labels).abs().mean())

    good = quantize_and_check(
        net,
        mean_absolute_error,
        [images[:8]],
        tmp_path,
        key_metric="mae",
        metric_higher_is_better=False,
        max_metric_drop=0.02,
        latency_repeats=1,
    )
    assert good.accepted and good.metric_drop == pytest.approx(good.int8_metric - good.fp32_metric)
    assert good.fp32_metric < 0.1 and len(calls) == 2 and (tmp_path / "model_int8.pt2").is_file()
    # both metrics evaluated eagerly (int8 graphs would compile per batch shape), the latency timed compiled
    assert not any(isinstance(network, CompiledForCPU) for network in calls)
    deployed = "compiled" if has_cpp_compiler() else "eager"
    assert good.latency["fp32_mode"] == good.latency["int8_mode"] == deployed
    assert json.loads((tmp_path / "quantization_report.json").read_text()) == good.to_dict()

    bad = quantize_and_check(
        net,
        mean_absolute_error,
        [torch.zeros(4, 1, 24, 24)],
        tmp_path,
        key_metric="mae",
        metric_higher_is_better=False,
        fp32_metric=good.fp32_metric,
        compile=False,
        latency_repeats=0,
    )
    assert not bad.accepted and bad.metric_drop > 0.01 and bad.int8_metric > bad.fp32_metric
    assert bad.fp32_metric_source == "given" and len(calls) == 3  # fp32 not evaluated again
    assert not (tmp_path / "model_int8.pt2").exists() and bad.rejected_artifact is not None


def test_metric_direction_and_calibration_patches():
    assert higher_is_better(lambda current, best: current > best)
    assert not higher_is_better(lambda current, best: current < best)
    with pytest.raises(ValueError, match="higher or lower"):
        higher_is_better(lambda current, best: True)
    # 3 cases of 40x24 with a 16x16 window (overlap 0.25): 9 windows each; 5 patches spread as 2 + 2 + 1
    cases = [{"image": torch.arange(40 * 24.0).reshape(1, 1, 40, 24) + 1000 * i} for i in range(3)]
    inferer = SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=2, overlap=0.25)
    batches = list(calibration_patches(cases, inferer, max_patches=5))
    assert [len(b) for b in batches] == [2, 2, 1] and all(b.shape[1:] == (1, 16, 16) for b in batches)
    patches = torch.cat(batches)
    assert [int(p.min() // 1000) for p in patches] == [0, 0, 1, 1, 2]  # spread over the cases
    assert patches[0].min() != patches[1].min()  # and over each image
    small = list(calibration_patches([torch.ones(1, 1, 8, 8)], inferer, max_patches=None))
    assert len(small) == 1 and small[0].shape == (1, 1, 16, 16) and small[0].sum() == 64  # padded like the window
    assert [len(b) for b in calibration_patches([torch.ones(4, 1, 8, 8)] * 3, max_patches=6)] == [4, 2]  # images
