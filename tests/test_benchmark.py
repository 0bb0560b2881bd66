"""``python -m monai_qsa benchmark`` on a tiny configuration: its figures against direct calls of the complexity
counters for the same models, its plots, the rerun logic and the README update."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from monai_qsa.__main__ import main
from monai_qsa.benchmark.measure import load_network
from monai_qsa.benchmark.report import PUBLISHED_RANGES, update_readme
from monai_qsa.benchmark.tasks import BENCHMARK_TASKS, cnn_network_def, default_bundle_dir
from monai_qsa.benchmark.train import EarlyStopping, trained_run
from monai_qsa.data import make_synthetic_dataset
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """The classification benchmark on 16 training / 8 validation images, one epoch, one thread, one timed pass,
    run through the command line."""
    root = tmp_path_factory.mktemp("benchmark")
    make_synthetic_dataset("cls", root / "data", seed=0, num_cases=(16, 8, 0))
    output = root / "out"
    argv = [
        "benchmark",
        "--task",
        "cls",
        "--output",
        str(output),
        "--dataset_dir",
        str(root / "data"),
        "--epochs",
        "1",
        "--repeats",
        "1",
        "--min_seconds",
        "0",
        "--threads",
        "1",
        "--max_cases",
        "2",
        "--eager",
    ]
    assert main(argv) == 0
    return output, root / "data", json.loads((output / "report.json").read_text())


def test_report_figures_agree_with_direct_counts(tiny_benchmark):
    output, data, report = tiny_benchmark
    bundle = default_bundle_dir(BENCHMARK_TASKS["cls"])
    assert list(report["models"]) == ["cnn_fp32", "cnn_int8", "sa_fp32", "sa_int8"]
    example = torch.zeros(1, *report["flops_input_shape"])
    for model in ("cnn", "sa"):
        checkpoint = output / "runs" / model / "seed0" / "models" / "model.pt"
        network = load_network(str(bundle), str(data), report["networks"][model], str(checkpoint))
        fp32, int8 = report["models"][f"{model}_fp32"], report["models"][f"{model}_int8"]
        assert fp32["parameters"] == int8["parameters"] == count_parameters(network)
        assert fp32["flops"] == count_flops(network, example) > 0
        assert fp32["size_bytes"] == serialized_size(network)
        assert int8["size_bytes"] == serialized_size(int8["file"])
        assert int8["size_bytes"] < 0.5 * fp32["size_bytes"]
        for row in (fp32, int8):
            timing = row["timing"]["1"]
            assert len(timing["latency_ms"]) == 2 and timing["median_ms"] > 0  # 2 cases x 1 pass
            assert 0.0 <= row["metric"]["mean"] <= 1.0
    assert report["networks"]["cnn"]["_target_"] == "monai.networks.nets.ResNet"
    relative = report["relative"]
    assert relative["size"] == pytest.approx(
        100 * (1 - report["models"]["sa_int8"]["size_bytes"] / report["models"]["cnn_fp32"]["size_bytes"])
    )
    assert relative["published_ranges"] == {k: list(v) for k, v in PUBLISHED_RANGES.items()}
    assert report["machine"]["torch"] == torch.__version__


def test_report_files_and_plots(tiny_benchmark):
    output, _, report = tiny_benchmark
    text = (output / "report.md").read_text()
    assert "| SA int8 |" in text and "50–80 %" in text and report["machine"]["cpu"] in text
    assert "CodeCarbon" in text or "RAPL" in text or "unavailable" in text  # the energy method is stated
    for name in ("metric_vs_latency.png", "metric_vs_energy.png", "size.png"):
        content = (output / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5000, name


def test_rerun_reuses_matching_training_only(tiny_benchmark, tmp_path):
    output, data, report = tiny_benchmark
    bundle = default_bundle_dir(BENCHMARK_TASKS["cls"])
    run_dir = output / "runs" / "sa" / "seed0"
    network = report["networks"]["sa"]
    assert (
        trained_run(run_dir, bundle, data, network, 0, 1)["fp32_metric"]
        == report["models"]["sa_fp32"]["metric"]["mean"]
    )
    assert trained_run(run_dir, bundle, data, network, 0, 2) is None  # other epochs: train again
    assert trained_run(run_dir, bundle, data, network, 1, 1) is None  # other seed
    stopping = EarlyStopping(patience=2, val_interval=1)
    assert trained_run(run_dir, bundle, data, network, 0, 1, stopping) is None  # early stopping now
    failed = tmp_path / "failed"
    shutil.copytree(run_dir, failed)
    (failed / "models" / "quantization_report.json").write_text(json.dumps({"error": "ValueError: boom"}))
    assert trained_run(failed, bundle, data, network, 0, 1) is None  # a failed int8 step is redone


def test_update_readme_replaces_only_its_block(tiny_benchmark, tmp_path):
    _, _, report = tiny_benchmark
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- benchmark:cls -->\nold\n<!-- /benchmark:cls -->\n"
        "<!-- benchmark:seg2d -->\nkeep\n<!-- /benchmark:seg2d -->\n"
    )
    update_readme(readme, report)
    text = readme.read_text()
    assert "old" not in text and "| SA int8 |" in text and "keep" in text and text.startswith("intro\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="benchmark:cls"):
        update_readme(readme, report)


def test_cnn_baselines_and_argument_errors(tmp_path, capsys):
    sa_unet = {
        "_target_": "monai_qsa.networks.nets.SAUNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "features": [8, 16, 32],
    }
    matched = cnn_network_def(sa_unet)
    assert (
        matched["_target_"] == "monai.networks.nets.UNet"
        and matched["channels"] == [8, 16, 32]
        and matched["strides"] == [2, 2]
    )
    assert cnn_network_def(sa_unet, "standard")["_target_"] == "monai.networks.nets.BasicUNet"
    with pytest.raises(ValueError, match="baseline"):
        cnn_network_def(sa_unet, "vgg")
    assert main(["benchmark", "--task", "cls", "--output", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
