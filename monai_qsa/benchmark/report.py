"""The benchmark's report: machine description, the paper-style relative figures, ``report.json``,
``report.md``, PNG plots, and the generated table in README.md."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

from monai_qsa.benchmark.plots import LABELS, write_plots
from monai_qsa.utils.cpu import cpu_flags, cpu_model

__all__ = [
    "machine_info",
    "relative_figures",
    "markdown_report",
    "write_report",
    "update_readme",
    "replace_generated_block",
    "PUBLISHED_RANGES",
    "LABELS",
]

#: reductions of SA int8 vs CNN fp32 claimed by Sathish, Khare & Sheet (2022), in percent
PUBLISHED_RANGES = {"size": (50, 80), "parameters": (60, 80), "flops": (40, 85), "energy": (65, 80)}
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine_info() -> dict:
    """CPU model, ISA extensions relevant to int8, cores, and the software versions of the run."""
    import monai

    return {
        "cpu": cpu_model(),
        "isa": [flag for flag in _ISA_FLAGS if flag in cpu_flags()],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def _reduction(sa: float | None, cnn: float | None) -> float | None:
    return None if sa is None or not cnn else 100.0 * (1.0 - sa / cnn)


def relative_figures(models: dict, threads: int) -> dict:
    """SA int8 relative to CNN fp32 as the paper states them (percent reduction), energy and latency at ``threads``."""
    sa, cnn = models["sa_int8"], models["cnn_fp32"]
    timing_sa, timing_cnn = sa["timing"][str(threads)], cnn["timing"][str(threads)]
    return {
        "size": _reduction(sa["size_bytes"], cnn["size_bytes"]),
        "parameters": _reduction(sa["parameters"], cnn["parameters"]),
        "flops": _reduction(sa["flops"], cnn["flops"]),
        "energy": _reduction(timing_sa["energy_j_per_case"], timing_cnn["energy_j_per_case"]),
        "latency_ratio": timing_sa["median_ms"] / timing_cnn["median_ms"],
        "threads": threads,
        "published_ranges": PUBLISHED_RANGES,
    }


def _spread(timing: dict) -> str:
    runs = timing["latency_ms"]
    return f"{timing['median_ms']:.1f} ({min(runs):.1f}–{max(runs):.1f})"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} %"


def markdown_table(report: dict) -> str:
    """The comparison table and the relative figures, as Markdown."""
    threads = report["threads"]
    header = [
        "model",
        "parameters",
        "size (KiB)",
        "GMAC",
        *[f"latency ms, {t} thr (min–max)" for t in threads],
        *[f"energy J/case, {t} thr" for t in threads],
        report["metric"],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in report["models"].items():
        timing = row["timing"]
        energies = [timing[str(t)]["energy_j_per_case"] for t in threads]
        metric = row["metric"]
        gate = "" if row.get("accepted", True) else " (rejected by the drop gate)"
        cells = [
            LABELS[key] + gate,
            f"{row['parameters']:,}",
            f"{row['size_bytes'] / 1024:.0f}",
            f"{row['flops'] / 1e9:.3f}",
            *[_spread(timing[str(t)]) for t in threads],
            *["n/a" if e is None else f"{e:.3f}" for e in energies],
            f"{metric['mean']:.4f} ± {metric['std']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    relative = report["relative"]
    lines += [
        "",
        f"SA int8 vs CNN fp32 ({relative['threads']} threads for energy and latency):",
        "",
        "| figure | this run | published |",
        "|---|---|---|",
    ]
    for name, (low, high) in PUBLISHED_RANGES.items():
        lines.append(f"| {name} reduction | {_percent(relative[name])} | {low}–{high} % |")
    lines.append(f"| latency SA int8 / CNN fp32 | {relative['latency_ratio']:.2f}x | — |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """``report.md``: the table plus how it was obtained."""
    machine = report["machine"]
    methods = {row["timing"][str(t)]["energy_method"] for row in report["models"].values() for t in report["threads"]}
    modes = {LABELS[k]: row["timing"]["mode"] for k, row in report["models"].items()}
    return "\n".join(
        [
            f"# monai_qsa benchmark: {report['task']}",
            "",
            markdown_table(report),
            "",
            f"- {report['metric']}: {report['metric_split']}; "
            f"mean ± std over seeds {report['seeds']}, {report['epochs']} epochs each.",
            f"- CNN baseline ({report['baseline']}): `{report['networks']['cnn']['_target_']}`; "
            f"SA: `{report['networks']['sa']['_target_']}`; "
            "same data, transforms, loss, optimiser, schedule and seed.",
            f"- GMAC: multiply-adds of one network input of shape {report['flops_input_shape']} "
            "(int8 rows: the same operations in int8). Sizes: fp32 state_dict, int8 `.pt2` file.",
            f"- Latency: median per case (min–max) over at least {report['repeats']} passes "
            f"and {report['min_seconds']:g} s per model and thread count; run modes {modes}.",
            f"- Energy: {'; '.join(sorted(methods))}.",
            f"- Machine: {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX2/AVX-512'}; "
            f"torch CPU capability {machine['torch_cpu_capability']}), {machine['logical_cpus']} logical CPUs, "
            f"torch {machine['torch']}, MONAI {machine['monai']}, Python {machine['python']}.",
            "",
        ]
    )


def write_report(report: dict, output: Path) -> None:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``output``."""

    output.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(p) for p in write_plots(report, output)]
    (output / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown_report(report)
    (output / "report.md").write_text(text)
    print(text)


def replace_generated_block(markdown_file: str | os.PathLike, name: str, body: str) -> None:
    """Replace the generated block ``<!-- name -->`` … ``<!-- /name -->`` of ``markdown_file`` with ``body``; the rest
    of the file is kept byte for byte.

    Raises:
        ValueError: the markers are missing, naming the file.
    """
    path = Path(markdown_file)
    text = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{start}' ... '{end}' block to replace.")
    path.write_text(pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text))


def update_readme(readme: str | os.PathLike, report: dict) -> None:
    """Replace the generated block ``<!-- benchmark:<task> -->`` … ``<!-- /benchmark:<task> -->`` of ``readme``
    with this report's table.

    Raises:
        ValueError: the markers are missing, naming the file.
    """
    body = markdown_report(report).split("\n", 2)[2]  # without the title line
    replace_generated_block(readme, f"benchmark:{report['task']}", body)
