"""``python -m monai_qsa benchmark --sweep`` on a tiny configuration: its figures against direct calls of the
complexity counters for the same models, its plots, its matched-accuracy table recomputed from report.json alone
(pairs chosen from each model's own timing, ratios from the pairs' timing in turn), the end-to-end timing, and a
rerun that trains and times nothing again."""

from __future__ import annotations

import copy
import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from monai_qsa.__main__ import main
from monai_qsa.benchmark.measure import load_network
from monai_qsa.benchmark.sweep import PAIRED_ROUNDS, SweepModel, cnn_models, default_sweep_models, run_sweep
from monai_qsa.benchmark.sweep_report import (
    PAIRED_ROLES,
    TARGETS,
    markdown_sweep_report,
    matched_accuracy_table,
    pair_name,
    pareto_front,
    update_readme_with_sweep,
)
from monai_qsa.benchmark.tasks import BENCHMARK_TASKS, default_bundle_dir
from monai_qsa.data import make_synthetic_dataset
from monai_qsa.networks.nets import SAUNET_PRESETS
from monai_qsa.utils.complexity import count_flops, count_parameters, serialized_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IO = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}
SAUNET = "monai_qsa.networks.nets.SAUNet"
TINY_MODELS = [
    SweepModel("SA-4", "SA", {"_target_": SAUNET, **IO, "features": [4, 8], "num_heads": 2, "kernel_size": 3}),
    SweepModel(
        "SA-8-light",
        "SA",
        {"_target_": SAUNET, **IO, "features": [8, 16], "num_heads": 2, "kernel_size": 3, "decoder": "light"},
    ),
    *cnn_models(IO, (4,))[:1],  # UNet-4
]


def _sweep(root, progress=False):
    return run_sweep(
        "seg2d",
        root / "out",
        models=TINY_MODELS,
        dataset_dir=root / "data",
        max_epochs=2,
        patience=1,
        repeats=1,
        min_seconds=0,
        threads=(1,),
        max_cases=2,
        tolerance=1.0,  # two epochs leave the Dice of any model near chance: every SA model matches every CNN
        volume_shape=(64, 48),
        compile=False,
        progress=progress,
    )


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The seg2d sweep of two tiny SAUNets and a UNet of width 4 on 8 training / 2 validation images, at most 2
    epochs, eager, one thread, one timed pass, every SA model matching every CNN, a 64x48 end-to-end image."""
    root = tmp_path_factory.mktemp("sweep")
    make_synthetic_dataset("seg2d", root / "data", seed=0, num_cases=(8, 2, 0))
    report = _sweep(root)
    assert report == json.loads((root / "out" / "report.json").read_text())
    return root, report


def test_figures_agree_with_direct_counts(tiny_sweep):
    root, report = tiny_sweep
    bundle = default_bundle_dir(BENCHMARK_TASKS["seg2d"])
    assert list(report["models"]) == ["SA-4", "SA-8-light", "UNet-4"]
    for model in TINY_MODELS:
        row = report["models"][model.name]
        network = load_network(str(bundle), str(root / "data"), model.network_def, row["fp32_file"])
        assert row["family"] == model.family and row["network_def"] == model.network_def
        assert row["parameters"] == count_parameters(network)
        assert row["flops"] == count_flops(network, torch.zeros(1, *row["input_shape"])) > 0
        assert row["fp32_size_bytes"] == serialized_size(network)
        assert row["int8_size_bytes"] == serialized_size(row["int8_file"])
        assert 1 <= row["epochs_run"] <= 2
        assert sorted(row["timing"]) == ["fp32_eager", "int8_eager"]
        for timing in row["timing"].values():
            assert len(timing["1"]["latency_ms"]) == 2 and timing["1"]["median_ms"] > 0  # 2 cases x 1 pass
        assert 0.0 <= row["int8_metric"] <= 1.0 and 0.0 <= row["fp32_metric"] <= 1.0
    assert report["early_stopping"] == {"patience": 1, "val_interval": 1}
    assert report["machine"]["torch"] == torch.__version__


def _latency(row: dict, precision: str) -> float:
    return min(t["1"]["median_ms"] for mode, t in row["timing"].items() if mode.startswith(precision))


def _fastest_mode(row: dict, precision: str) -> str:
    return min((t["1"]["median_ms"], m) for m, t in row["timing"].items() if m.startswith(precision))[1]


def _energy(row: dict, precision: str) -> float | None:
    return row["timing"][_fastest_mode(row, precision)]["1"]["energy_j_per_case"]


def test_matched_accuracy_table_follows_from_the_report(tiny_sweep):
    _, report = tiny_sweep
    models = report["models"]
    cnns = [name for name, row in models.items() if row["family"] == "CNN"]
    assert [row["cnn"] for row in report["matched"]] == cnns
    for row in report["matched"]:
        cnn = models[row["cnn"]]
        target = cnn["fp32_metric"] - report["tolerance"]
        accurate = [n for n, r in models.items() if r["family"] == "SA" and r["int8_metric"] >= target]
        if not accurate:
            assert row["sa"] is None
            continue
        cheapest = min(accurate, key=lambda n: _latency(models[n], "int8"))  # chosen from the models' own timing
        sa = models[cheapest]
        assert row["sa"] == cheapest and row["sa_metric"] == sa["int8_metric"] and row["timed_in_turn"]
        paired = report["paired"][pair_name(row["cnn"], cheapest)]  # the ratios: from the pair timed in turn
        latency = {role: timing["median_ms"] for role, timing in paired.items()}
        fp32, int8 = row["vs_cnn_fp32"], row["vs_cnn_int8"]
        assert fp32["latency"] == pytest.approx(latency["sa_int8"] / latency["cnn_fp32"])
        assert int8["latency"] == pytest.approx(latency["sa_int8"] / latency["cnn_int8"])
        assert row["cnn_fp32_latency_ms"] == latency["cnn_fp32"] and row["sa_latency_ms"] == latency["sa_int8"]
        assert fp32["size"] == pytest.approx(sa["int8_size_bytes"] / cnn["fp32_size_bytes"])
        assert int8["size"] == pytest.approx(sa["int8_size_bytes"] / cnn["int8_size_bytes"])
        assert fp32["flops"] == int8["flops"] == pytest.approx(sa["flops"] / cnn["flops"])
        energy = {role: timing["energy_j_per_case"] for role, timing in paired.items()}
        if energy["sa_int8"] is not None and energy["cnn_fp32"]:
            assert fp32["energy"] == pytest.approx(energy["sa_int8"] / energy["cnn_fp32"])


def test_matched_pairs_are_timed_in_turn(tiny_sweep):
    _, report = tiny_sweep
    models = report["models"]
    pairs = {pair_name(row["cnn"], row["sa"]): row for row in report["matched"] if row["sa"] is not None}
    assert pairs and sorted(report["paired"]) == sorted(pairs)
    for name, timings in report["paired"].items():
        assert sorted(timings) == sorted(PAIRED_ROLES)
        for role, (model_key, precision) in PAIRED_ROLES.items():
            timing = timings[role]
            # each model in its fastest mode of its own timing; min_seconds 0: one pass of the 2 cases per round
            assert timing["timing_mode"] == _fastest_mode(models[pairs[name][model_key]], precision)
            assert len(timing["round_medians_ms"]) == PAIRED_ROUNDS and len(timing["latency_ms"]) == 2 * PAIRED_ROUNDS
            assert timing["median_ms"] == statistics.median(timing["latency_ms"]) > 0
            assert timing["mode"] == "eager"  # the tiny sweep runs eagerly
    text = markdown_sweep_report(report)
    assert f"timed against its CNN in turn, in one process ({PAIRED_ROUNDS} rounds)" in text
    assert "round after round" in text
    blind = copy.deepcopy(report)  # CodeCarbon failed for the CNN in fp32: no energy ratio, the latency ratios stand
    for timings in blind["paired"].values():
        timings["cnn_fp32"]["energy_j_per_case"] = None
    rows = [row for row in matched_accuracy_table(blind) if row["sa"] is not None]
    assert rows and all(row["vs_cnn_fp32"]["energy"] is None and row["vs_cnn_fp32"]["latency"] > 0 for row in rows)


def test_fronts_plots_and_markdown(tiny_sweep):
    root, report = tiny_sweep
    every = [(n, p, r[f"{p}_metric"], _latency(r, p)) for n, r in report["models"].items() for p in ("fp32", "int8")]
    front = [
        f"{n} {p}"
        for n, p, metric, latency in every
        if not any(m >= metric and t <= latency and (m, t) != (metric, latency) for _, _, m, t in every)
    ]
    assert sorted(report["fronts"]["latency_ms"]) == sorted(front)
    for name in ("accuracy_vs_latency.png", "accuracy_vs_energy.png"):
        content = (root / "out" / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5000, name
    text = (root / "out" / "report.md").read_text()
    assert "| SA-4 |" in text and "Matched accuracy" in text and report["machine"]["cpu"] in text
    assert "CodeCarbon" in text or "RAPL" in text or "unavailable" in text  # the energy method is stated


def test_readme_summary_comes_from_the_report(tiny_sweep, tmp_path):
    _, report = tiny_sweep
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(
        "intro\n<!-- sweep:seg2d -->\nold\n<!-- /sweep:seg2d -->\n<!-- benchmark:seg2d -->\nkeep\n"
        "<!-- /benchmark:seg2d -->\n"
    )
    update_readme_with_sweep(readme, report)
    text = readme.read_text()
    assert text.startswith("intro\n") and "old" not in text and "\nkeep\n" in text
    for row in report["matched"]:
        line = next(
            line for line in text.splitlines() if line.startswith(f"| {row['cnn']} ({row['cnn_metric']:.3f}) |")
        )
        if row["sa"] is None:
            assert "| none |" in line
        else:
            fp32, int8 = row["vs_cnn_fp32"], row["vs_cnn_int8"]
            ratios = [fp32["latency"], int8["latency"], fp32["energy"], int8["energy"], fp32["flops"]]
            assert [f"{r:.2f}x" for r in ratios if r is not None] == re.findall(r"[\d.]+x", line)[: len(ratios)]
    met = [
        row
        for row in report["matched"]
        if row["sa"] is not None
        and all(
            row[f"vs_cnn_{p}"][figure] is None or row[f"vs_cnn_{p}"][figure] <= target
            for p, target in TARGETS.items()
            for figure in ("latency", "energy")
        )
    ]
    assert f"met against {len(met)} of {len(report['matched'])} CNNs" in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert [(readme.parent / link).resolve() for link in links] == [Path(p).resolve() for p in report["plots"]]

    slow = copy.deepcopy(report)  # a match that misses two of the targets
    row = slow["matched"][0]
    ratios = {"size": 0.1, "flops": 0.2, "parameters": 0.3}
    row |= {
        "sa": "SA-4",
        "sa_metric": row["cnn_metric"],
        "vs_cnn_fp32": {"latency": 0.61, "energy": 0.3, **ratios},
        "vs_cnn_int8": {"latency": 0.9, "energy": 1.2, **ratios},
    }
    update_readme_with_sweep(readme, slow)
    assert f"missed against {row['cnn']} (latency 0.61x its fp32; energy 1.20x its int8)" in readme.read_text()
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="sweep:seg2d"):
        update_readme_with_sweep(tmp_path / "plain.md", report)


def test_end_to_end_timing(tiny_sweep):
    _, report = tiny_sweep
    end_to_end = report["end_to_end"]
    assert end_to_end["shape"] == [64, 48]
    runs = end_to_end["runs"]
    assert [(r["precision"]) for r in runs] == ["fp32", "int8", "int8"]
    assert report["models"][runs[0]["model"]]["family"] == "CNN" and runs[0]["model"] == runs[1]["model"]
    assert report["models"][runs[2]["model"]]["family"] == "SA"
    for run in runs:
        assert run["wall_s"] >= run["first_case_s"] > 0 and run["case_s"] >= 0 and run["network_s"] > 0


def test_rerun_trains_and_times_nothing_again(tiny_sweep):
    root, report = tiny_sweep
    before = {p: p.stat().st_mtime_ns for p in (root / "out" / "runs").rglob("*") if p.is_file()}
    again = _sweep(root)
    after = {p: p.stat().st_mtime_ns for p in (root / "out" / "runs").rglob("*") if p.is_file()}
    assert before == after  # no training, quantisation or timing wrote anything
    assert again["models"] == report["models"] and again["end_to_end"] == report["end_to_end"]


def test_pareto_front_and_arguments(tmp_path, capsys):
    candidates = [
        {"metric": 0.9, "cost": 10.0},
        {"metric": 0.8, "cost": 5.0},
        {"metric": 0.8, "cost": 6.0},  # beaten: as accurate, dearer
        {"metric": 0.95, "cost": None},  # not measured
        {"metric": 0.7, "cost": 20.0},  # beaten
    ]
    assert pareto_front(candidates, "cost") == [candidates[1], candidates[0]]
    assert [m.name for m in cnn_models(IO, (8, 16))] == ["UNet-8", "UNet-16", "BasicUNet-8", "BasicUNet-16"]
    assert cnn_models(IO, (8,))[1].network_def["features"] == [8, 8, 16, 32, 64, 8]
    sa = [m for m in default_sweep_models("seg3d") if m.family == "SA"]
    assert [m.network_def["preset"] for m in sa] == list(SAUNET_PRESETS)
    assert {m.network_def["kernel_size"] for m in sa} == {3}  # the bundle's 3D neighbourhood
    with pytest.raises(ValueError, match="one SA and one CNN"):
        run_sweep("seg2d", tmp_path, models=TINY_MODELS[2:])
    with pytest.raises(ValueError, match="family"):
        SweepModel("x", "ViT", {})
    assert main(["benchmark", "--sweep", "--task", "cls", "--output", str(tmp_path)]) == 2
    assert "seg2d" in capsys.readouterr().err
    assert main(["benchmark", "--sweep", "--task", "seg2d", "--output", str(tmp_path), "--seeds", "0", "1"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
