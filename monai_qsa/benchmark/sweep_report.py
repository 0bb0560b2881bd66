"""What the sweep's figures mean, computed from its report alone: each model's fastest run mode, the
accuracy-vs-cost Pareto fronts, the matched-accuracy table, and ``report.json`` / ``report.md`` / the front plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai_qsa.benchmark.plots import write_front_plot
from monai_qsa.benchmark.report import PUBLISHED_RANGES, replace_generated_block

__all__ = [
    "fastest",
    "points",
    "pareto_front",
    "pareto_fronts",
    "matched_accuracy_table",
    "matched_pairs",
    "chosen_models",
    "markdown_sweep_report",
    "write_sweep_report",
    "readme_summary",
    "update_readme_with_sweep",
    "pair_name",
    "COSTS",
    "PAIRED_ROLES",
    "TARGETS",
]

#: the cost axes of the fronts: report field of a point → axis label
COSTS = {"latency_ms": "latency per case (ms, median)", "energy_j": "energy per case (J)"}
#: the product's target at matched accuracy: SA int8 latency and energy at most these multiples of the CNN's, per CNN
#: precision
TARGETS = {"fp32": 0.5, "int8": 1.0}
#: the models of a matched pair timed in turn (``report["paired"]``): role → (which model of the pair, ``"sa"`` or
#: ``"cnn"``, precision)
PAIRED_ROLES = {"sa_int8": ("sa", "int8"), "cnn_fp32": ("cnn", "fp32"), "cnn_int8": ("cnn", "int8")}


def fastest(row: dict, precision: str, threads: int) -> dict:
    """The fastest run mode of one model of the report at ``precision`` and ``threads``: ``{"mode", "latency_ms",
    "energy_j", "energy_method"}`` (energy measured in that mode; None where CodeCarbon could not measure).

    Raises:
        ValueError: the model has no timing at ``precision``.
    """
    modes = {mode: timing[str(threads)] for mode, timing in row["timing"].items() if mode.startswith(f"{precision}_")}
    if not modes:
        raise ValueError(f"precision must be one the model was timed at ({sorted(row['timing'])}), got {precision!r}.")
    mode = min(modes, key=lambda m: (modes[m]["median_ms"], m))
    best = modes[mode]
    return {
        "mode": mode,
        "latency_ms": best["median_ms"],
        "energy_j": best["energy_j_per_case"],
        "energy_method": best["energy_method"],
    }


def points(report: dict) -> list[dict]:
    """One point per model and precision: ``{"model", "family", "precision", "metric", "latency_ms", "energy_j",
    "mode"}``, the costs of the fastest mode at the report's reference thread count."""
    threads = report["reference_threads"]
    return [
        {
            "model": name,
            "family": row["family"],
            "precision": precision,
            "metric": row[f"{precision}_metric"],
            **fastest(row, precision, threads),
        }
        for name, row in report["models"].items()
        for precision in ("fp32", "int8")
    ]


def pareto_front(candidates: list[dict], cost: str) -> list[dict]:
    """The points no other point beats: none has a cost at most theirs and a metric at least theirs, one of them
    strictly. Cheapest first; points without a ``cost`` value are left out."""
    ordered = sorted((p for p in candidates if p[cost] is not None), key=lambda p: (p[cost], -p["metric"]))
    front: list[dict] = []
    for point in ordered:
        if not front or point["metric"] > front[-1]["metric"]:
            front.append(point)
    return front


def pareto_fronts(report: dict) -> dict:
    """``{cost: ["<model> <precision>", ...]}`` for each cost of :data:`COSTS`, over both families and
    precisions, cheapest first."""
    every = points(report)
    return {cost: [f"{p['model']} {p['precision']}" for p in pareto_front(every, cost)] for cost in COSTS}


def pair_name(cnn: str, sa: str) -> str:
    """The key of a matched pair in ``report["paired"]`` (and the name of its timing files)."""
    return f"{cnn}--{sa}"


def _paired_costs(timing: dict) -> dict:
    """A paired timing (:func:`~monai_qsa.benchmark.measure.measure_alternating`) as :func:`fastest` gives costs."""
    return {
        "mode": timing["timing_mode"],
        "latency_ms": timing["median_ms"],
        "energy_j": timing["energy_j_per_case"],
        "energy_method": timing["energy_method"],
    }


def _ratio(sa: float | None, cnn: float | None) -> float | None:
    return None if sa is None or not cnn else sa / cnn


def _ratios(sa: dict, cnn: dict, sa_row: dict, cnn_row: dict, cnn_precision: str) -> dict:
    return {
        "latency": _ratio(sa["latency_ms"], cnn["latency_ms"]),
        "energy": _ratio(sa["energy_j"], cnn["energy_j"]),
        "size": _ratio(sa_row["int8_size_bytes"], cnn_row[f"{cnn_precision}_size_bytes"]),
        "flops": _ratio(sa_row["flops"], cnn_row["flops"]),
        "parameters": _ratio(sa_row["parameters"], cnn_row["parameters"]),
    }


def matched_pairs(report: dict) -> dict[str, str | None]:
    """For each CNN of the report, the cheapest (latency, fastest mode, reference threads, from each model's own
    timing) SA model whose int8 validation metric is at least the CNN's fp32 metric minus the report's
    ``tolerance``, or None where no SA model is that accurate: ``{cnn: sa}``."""
    threads, models = report["reference_threads"], report["models"]
    pairs = {}
    for cnn, cnn_row in models.items():
        if cnn_row["family"] != "CNN":
            continue
        target = cnn_row["fp32_metric"] - report["tolerance"]
        accurate = [
            (fastest(row, "int8", threads)["latency_ms"], name)
            for name, row in models.items()
            if row["family"] == "SA" and row["int8_metric"] >= target
        ]
        pairs[cnn] = min(accurate)[1] if accurate else None
    return pairs


def matched_accuracy_table(report: dict) -> list[dict]:
    """For each CNN of the report, its SA int8 match (:func:`matched_pairs`) with SA int8 / CNN ratios of latency,
    energy, stored size, multiply-adds and parameters against the CNN in fp32 (its fastest mode) and in int8. ``sa``
    is None where no SA model is accurate enough. Where ``report["paired"]`` holds the pair timed in turn (see
    :data:`PAIRED_ROLES`), the latencies and energies of the row come from that timing (``timed_in_turn`` True).

    Returns:
        rows ``{"cnn", "cnn_metric", "sa", "sa_metric", "timed_in_turn", "sa_latency_ms", "cnn_fp32_latency_ms",
        "cnn_int8_latency_ms", "vs_cnn_fp32": {"latency", "energy", "size", "flops", "parameters"}, "vs_cnn_int8":
        {...}}``.
    """
    threads, models = report["reference_threads"], report["models"]
    rows = []
    for cnn, sa in matched_pairs(report).items():
        cnn_row = models[cnn]
        costs = {"cnn_fp32": fastest(cnn_row, "fp32", threads), "cnn_int8": fastest(cnn_row, "int8", threads)}
        row = {"cnn": cnn, "cnn_metric": cnn_row["fp32_metric"], "sa": None}
        if sa is not None:
            sa_row = models[sa]
            paired = report.get("paired", {}).get(pair_name(cnn, sa))
            if paired is not None:
                costs = {role: _paired_costs(timing) for role, timing in paired.items()}
            else:
                costs["sa_int8"] = fastest(sa_row, "int8", threads)
            row |= {
                "sa": sa,
                "sa_metric": sa_row["int8_metric"],
                "timed_in_turn": paired is not None,
                "sa_latency_ms": costs["sa_int8"]["latency_ms"],
                "vs_cnn_fp32": _ratios(costs["sa_int8"], costs["cnn_fp32"], sa_row, cnn_row, "fp32"),
                "vs_cnn_int8": _ratios(costs["sa_int8"], costs["cnn_int8"], sa_row, cnn_row, "int8"),
            }
        row |= {
            "cnn_fp32_latency_ms": costs["cnn_fp32"]["latency_ms"],
            "cnn_int8_latency_ms": costs["cnn_int8"]["latency_ms"],
        }
        rows.append(row)
    return rows


def chosen_models(report: dict) -> dict:
    """The models timed end to end: ``{"cnn": the most accurate CNN (fp32), "sa": its match in the matched-accuracy
    table, or else the most accurate SA int8 model}``; ties go to the faster model."""
    threads, models = report["reference_threads"], report["models"]

    def best(family: str, precision: str) -> str:
        names = [n for n, row in models.items() if row["family"] == family]
        return min(
            names,
            key=lambda n: (-models[n][f"{precision}_metric"], fastest(models[n], precision, threads)["latency_ms"]),
        )

    cnn = best("CNN", "fp32")
    match = next(row["sa"] for row in report["matched"] if row["cnn"] == cnn)
    return {"cnn": cnn, "sa": match or best("SA", "int8")}


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _models_table(report: dict) -> list[str]:
    threads = report["threads"]
    modes = list(next(iter(report["models"].values()))["timing"])
    header = [
        "model",
        "parameters",
        "GMAC",
        "size fp32 / int8 (KiB)",
        "epochs",
        "train (s)",
        f"{report['metric']} fp32 / int8",
        *[f"{mode} ms, {t} thr" for mode in modes for t in threads],
        f"energy J fp32 / int8, {report['reference_threads']} thr",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["models"].items():
        best = {p: fastest(row, p, report["reference_threads"]) for p in ("fp32", "int8")}
        gate = "" if row["int8_accepted"] else " (int8 rejected by the drop gate)"
        cells = [
            name + gate,
            f"{row['parameters']:,}",
            f"{row['flops'] / 1e9:.3f}",
            f"{row['fp32_size_bytes'] / 1024:.0f} / {row['int8_size_bytes'] / 1024:.0f}",
            str(row["epochs_run"]),
            f"{row['seconds']:.0f}",
            f"{row['fp32_metric']:.4f} / {row['int8_metric']:.4f}",
            *[f"{row['timing'][mode][str(t)]['median_ms']:.1f}" for mode in modes for t in threads],
            f"{_number(best['fp32']['energy_j'], '.3f')} / {_number(best['int8']['energy_j'], '.3f')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _matched_table(report: dict) -> list[str]:
    header = [
        "CNN",
        f"CNN {report['metric']} (fp32)",
        "cheapest SA int8 at matched accuracy",
        f"SA {report['metric']}",
        "latency / CNN fp32",
        "latency / CNN int8",
        "energy / CNN fp32",
        "energy / CNN int8",
        "size / CNN fp32",
        "size / CNN int8",
        "MACs / CNN",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["matched"]:
        if row["sa"] is None:
            lines.append(f"| {row['cnn']} | {row['cnn_metric']:.4f} | none within {report['tolerance']} |" + " |" * 8)
            continue
        fp32, int8 = row["vs_cnn_fp32"], row["vs_cnn_int8"]
        ratios = [
            fp32["latency"],
            int8["latency"],
            fp32["energy"],
            int8["energy"],
            fp32["size"],
            int8["size"],
            fp32["flops"],
        ]
        cells = [row["cnn"], f"{row['cnn_metric']:.4f}", row["sa"], f"{row['sa_metric']:.4f}"]
        lines.append("| " + " | ".join(cells + [_number(r, ".2f") + "x" for r in ratios]) + " |")
    return lines


def _end_to_end_table(report: dict) -> list[str]:
    end_to_end = report["end_to_end"]
    if not end_to_end:
        return ["(not measured)"]
    shape = "x".join(map(str, end_to_end["shape"]))
    lines = [
        f"One synthetic {shape} volume at {end_to_end['spacing_mm']:g} mm through `python -m monai_qsa infer` "
        f"(load, preprocessing, sliding window, inversion, save; {end_to_end['threads']} threads, a fresh process "
        "per model, four identical volumes: the first output includes start-up and compilation, the later ones give "
        "the medians of one case):",
        "",
        "| model | precision (mode) | whole command (s) | to the first output: start-up, compilation, case (s) "
        "| one case end to end (s, median) | its network time (s, median) "
        "| its energy, load to postprocessing (J, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in end_to_end["runs"]:
        cells = [
            run["model"],
            f"{run['precision']} ({run['mode']})",
            f"{run['wall_s']:.1f}",
            f"{run['first_case_s']:.1f}",
            f"{run['case_s']:.2f}",
            f"{run['network_s']:.2f}",
            _number(run["energy_j"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _energy_methods(report: dict) -> set[str]:
    """How the energy figures of the compared (fastest) modes were obtained."""
    threads = report["reference_threads"]
    return {fastest(row, p, threads)["energy_method"] for row in report["models"].values() for p in ("fp32", "int8")}


def markdown_sweep_report(report: dict) -> str:
    """``report.md``: the models, the fronts, the matched-accuracy table, the end-to-end timing and the method."""
    machine, threads = report["machine"], report["reference_threads"]
    stopping = report["early_stopping"]
    methods = _energy_methods(report)
    fronts = [f"- {COSTS[cost]}: " + " → ".join(front) for cost, front in report["fronts"].items()]
    return "\n".join(
        [
            f"# monai_qsa benchmark --sweep: {report['task']}",
            "",
            *_models_table(report),
            "",
            f"## Pareto fronts ({report['metric']} against cost, fastest mode, {threads} threads, cheapest first)",
            "",
            *fronts,
            "",
            f"## Matched accuracy: cheapest SA int8 with {report['metric']} ≥ the CNN's − {report['tolerance']}",
            "",
            f"Ratios SA int8 / CNN ({threads} threads, each model in its fastest mode, {_timing_of_pairs(report)}; "
            "below 1: SA is cheaper).",
            "",
            *_matched_table(report),
            "",
            "## End to end, clinical size",
            "",
            *_end_to_end_table(report),
            "",
            "## Method",
            "",
            f"- {report['metric']}: {report['metric_split']}; seed {report['seed']}; every model trained with the "
            f"bundle's train.json for at most {report['max_epochs']} epochs, validated every "
            f"{stopping['val_interval']} epoch(s), stopped after {stopping['patience']} validations without "
            "improvement (MONAI EarlyStopHandler on the validation Dice).",
            f"- int8: post-training quantisation (quantize_ptq via the bundle's PostTrainingQuantizationHandler); "
            f"GMAC: multiply-adds of one network input of shape {next(iter(report['models'].values()))['input_shape']}"
            "; sizes: fp32 state_dict, int8 .pt2 file.",
            f"- Latency: median per validation case (bundle preprocessing done, validation sliding-window inferer) "
            f"over at least {report['repeats']} passes of {report['max_cases']} cases and {report['min_seconds']:g} s "
            "per model, mode and thread count, each model in its own process; fastest mode per precision for every "
            "comparison. The matched table's pairs are then timed once more in one process, the SA model and the "
            "CNN in fp32 and in int8 in turn, round after round (the same total time per model), so that the "
            "machine's changing speed reaches both alike.",
            f"- Energy: {'; '.join(sorted(methods))}; measured over the same windows as the latency (for the "
            "matched pairs: one window per model and round, summed).",
            f"- Machine: {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX2/AVX-512'}), "
            f"{machine['logical_cpus']} logical CPUs, torch {machine['torch']}, MONAI {machine['monai']}, "
            f"Python {machine['python']}.",
            "",
        ]
    )


def write_sweep_report(report: dict, output: Path) -> None:
    """Write ``report.json``, ``report.md``, ``accuracy_vs_latency.png`` and ``accuracy_vs_energy.png`` into
    ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    every = points(report)
    title = f"{report['task']}: {report['metric']} vs"
    report["plots"] = [
        str(
            write_front_plot(
                every,
                pareto_front(every, cost),
                cost,
                xlabel,
                f"{title} {xlabel.split(' (')[0]}, {report['reference_threads']} threads",
                report["metric"],
                output / f"accuracy_vs_{cost.split('_')[0]}.png",
            )
        )
        for cost, xlabel in COSTS.items()
    ]
    (output / "report.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(markdown_sweep_report(report))


def _misses(row: dict) -> list[str]:
    """The targets of :data:`TARGETS` one matched row misses, as ``"latency 1.12x its fp32, 1.23x its int8"``."""
    misses = []
    for figure in ("latency", "energy"):
        ratios = {precision: row[f"vs_cnn_{precision}"][figure] for precision in TARGETS}
        missed = [f"{r:.2f}x its {p}" for p, r in ratios.items() if r is not None and r > TARGETS[p]]
        if missed:
            misses.append(f"{figure} {', '.join(missed)}")
    return misses


def _targets_line(matched: list[dict]) -> str:
    rows = [row for row in matched if row["sa"] is not None]
    missed = {row["cnn"]: misses for row in rows if (misses := _misses(row))}
    unmatched = [row["cnn"] for row in matched if row["sa"] is None]
    line = (
        f"Target (SA int8 latency and energy ≤ {TARGETS['fp32']}x the CNN's fp32 and ≤ {TARGETS['int8']}x its int8, "
        f"at matched accuracy): met against {len(rows) - len(missed)} of {len(matched)} CNNs"
    )
    details = [f"{cnn} ({'; '.join(misses)})" for cnn, misses in missed.items()]
    details += [f"{cnn} (no SA model as accurate)" for cnn in unmatched]
    return line + (f"; missed against {'; '.join(details)}." if details else ".")


def _reductions_line(matched: list[dict], energy_method: str) -> str:
    rows = [row for row in matched if row["sa"] is not None]
    parts = []
    figures = {"size": "size", "parameters": "parameters", "multiply-adds": "flops", "energy": "energy"}
    for figure, key in figures.items():
        values = [100 * (1 - row["vs_cnn_fp32"][key]) for row in rows if row["vs_cnn_fp32"][key] is not None]
        low, high = PUBLISHED_RANGES[key]
        measured = f"{min(values):.0f} to {max(values):.0f} %" if values else "n/a"
        parts.append(f"{figure} {measured} (published {low}–{high} %)")
    return (
        "Reductions of SA int8 against each CNN in fp32 at matched accuracy (negative: SA costs more): "
        + "; ".join(parts)
        + f". Energy: {energy_method}."
    )


def _timing_of_pairs(report: dict) -> str:
    """How the matched table's latencies and energies were timed, for the text above it."""
    rounds = {len(t["round_medians_ms"]) for pair in report.get("paired", {}).values() for t in pair.values()}
    pairs = [row for row in report["matched"] if row["sa"] is not None]
    if pairs and all(row.get("timed_in_turn") for row in pairs):  # reports written before pairs were timed lack it
        return (
            f"each SA model timed against its CNN in turn, in one process ({', '.join(map(str, sorted(rounds)))} "
            "rounds)"
        )
    return "each model timed on its own"


def readme_summary(report: dict, relative_to: str | os.PathLike = ".") -> str:
    """The sweep's result for a README: the matched-accuracy table with the ratios a user compares, whether the
    product's targets (:data:`TARGETS`) and the paper's published reductions hold, and the two front plots (linked
    relative to the folder ``relative_to``)."""
    threads, metric = report["reference_threads"], report["metric"]
    machine = report["machine"]
    lines = [
        f"Cheapest SA int8 model at matched accuracy ({metric} ≥ the CNN's − {report['tolerance']}), each model in "
        f"its fastest mode, {_timing_of_pairs(report)}, {threads} threads, {machine['cpu']} "
        f"({machine['logical_cpus']} logical CPUs); below 1 the SA model is cheaper:",
        "",
        f"| CNN ({metric} fp32) | SA int8 ({metric}) | latency / CNN fp32 | latency / CNN int8 | energy / CNN fp32 "
        "| energy / CNN int8 | multiply-adds | parameters | size (SA int8 / CNN fp32) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["matched"]:
        cnn = f"{row['cnn']} ({row['cnn_metric']:.3f})"
        if row["sa"] is None:
            lines.append(f"| {cnn} | none |" + " |" * 7)
            continue
        fp32, int8 = row["vs_cnn_fp32"], row["vs_cnn_int8"]
        ratios = [fp32["latency"], int8["latency"], fp32["energy"], int8["energy"]]
        ratios += [fp32["flops"], fp32["parameters"], fp32["size"]]
        cells = [cnn, f"{row['sa']} ({row['sa_metric']:.3f})"] + [_number(r, ".2f") + "x" for r in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    plots = [Path(os.path.relpath(plot, relative_to)).as_posix() for plot in report["plots"]]
    lines += [
        "",
        _targets_line(report["matched"]),
        "",
        _reductions_line(report["matched"], "; ".join(sorted(_energy_methods(report)))),
        "",
        " ".join(f"![{metric} against {Path(plot).stem.split('_vs_')[1]}]({plot})" for plot in plots),
    ]
    return "\n".join(lines)


def update_readme_with_sweep(readme: str | os.PathLike, report: dict) -> None:
    """Replace the generated block ``<!-- sweep:<task> -->`` … ``<!-- /sweep:<task> -->`` of ``readme`` with
    :func:`readme_summary`.

    Raises:
        ValueError: the markers are missing, naming the file.
    """
    summary = readme_summary(report, relative_to=Path(readme).resolve().parent)
    replace_generated_block(readme, f"sweep:{report['task']}", summary)
