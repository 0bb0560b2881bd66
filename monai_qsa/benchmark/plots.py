"""PNG plots of the benchmark: metric vs latency, metric vs energy, stored size."""

from __future__ import annotations

from pathlib import Path

__all__ = ["LABELS", "write_plots"]

#: how each benchmarked model is named in tables and legends
LABELS = {"cnn_fp32": "CNN fp32", "cnn_int8": "CNN int8", "sa_fp32": "SA fp32", "sa_int8": "SA int8"}
_COLOURS = {"cnn_fp32": "tab:blue", "cnn_int8": "tab:cyan", "sa_fp32": "tab:red", "sa_int8": "tab:orange"}


def _scatter(report: dict, value: str, xlabel: str, path: Path) -> Path:
    """Task metric (mean ± std over seeds) against a per-case timing value, one marker per model and thread count."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    markers = ["o", "s", "^", "D"]
    for key, row in report["models"].items():
        for marker, threads in zip(markers, report["threads"]):
            x = row["timing"][str(threads)][value]
            if x is None:
                continue
            axes.errorbar(
                x,
                row["metric"]["mean"],
                yerr=row["metric"]["std"],
                fmt=marker,
                color=_COLOURS[key],
                label=f"{LABELS[key]}, {threads} thr",
            )
    axes.set_xscale("log")  # CNN and SA, fp32 and int8 differ by orders of magnitude
    axes.set_xlabel(xlabel)
    axes.set_ylabel(f"{report['metric']} (validation)")
    axes.set_title(f"{report['task']}: {report['metric']} vs {xlabel.split(' (')[0]}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _size_bars(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    keys = list(report["models"])
    figure, axes = plt.subplots(figsize=(6, 4))
    sizes = [report["models"][k]["size_bytes"] / 1024 for k in keys]
    bars = axes.bar([LABELS[k] for k in keys], sizes, color=[_COLOURS[k] for k in keys])
    axes.bar_label(bars, fmt="%.0f")
    axes.set_ylabel("stored size (KiB)")
    axes.set_title(f"{report['task']}: model size (fp32 state_dict, int8 .pt2)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_plots(report: dict, output: Path) -> list[Path]:
    """Write ``metric_vs_latency.png``, ``metric_vs_energy.png`` and ``size.png`` into ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    return [
        _scatter(report, "median_ms", "latency per case (ms, median)", output / "metric_vs_latency.png"),
        _scatter(report, "energy_j_per_case", "energy per case (J)", output / "metric_vs_energy.png"),
        _size_bars(report, output / "size.png"),
    ]
