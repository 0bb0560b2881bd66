"""PNG plots of the benchmark (metric vs latency, metric vs energy, stored size) and of the sweep (accuracy-vs-cost
fronts)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["LABELS", "write_plots", "write_front_plot"]

#: how each benchmarked model is named in tables and legends
LABELS = {"cnn_fp32": "CNN fp32", "cnn_int8": "CNN int8", "sa_fp32": "SA fp32", "sa_int8": "SA int8"}
_COLOURS = {"cnn_fp32": "tab:blue", "cnn_int8": "tab:cyan", "sa_fp32": "tab:red", "sa_int8": "tab:orange"}


def _save_log_x(figure, axes, xlabel: str, ylabel: str, title: str, path: Path, title_size: float | None = None):
    """Label the axes (x logarithmic: CNN and SA, fp32 and int8 differ by orders of magnitude), add grid and legend,
    write ``path`` and close the figure; returns ``path``."""
    import matplotlib.pyplot as plt

    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
    title = f"{report['task']}: {report['metric']} vs {xlabel.split(' (')[0]}"
    return _save_log_x(figure, axes, xlabel, f"{report['metric']} (validation)", title, path)


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


def write_front_plot(
    points: list[dict], front: list[dict], cost: str, xlabel: str, title: str, metric: str, path: Path
) -> Path:
    """Metric against a cost, one marker per model and precision, coloured by family and precision (the colours of
    :func:`write_plots`), each named, with the Pareto front drawn as a step line through its circled points.

    Args:
        points: ``{"model", "family" ("SA"/"CNN"), "precision", "metric", cost}`` dicts; those without a ``cost``
            value are left out.
        front: the Pareto-optimal subset of ``points``, cheapest first.
        cost: the key of the cost in each point (the x axis, logarithmic).
        xlabel: x axis label.
        title: figure title.
        metric: name of the metric (y axis).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key in _COLOURS:
        family, precision = key.split("_")
        chosen = [p for p in points if p["family"].lower() == family and p["precision"] == precision]
        chosen = [p for p in chosen if p[cost] is not None]
        if chosen:
            axes.scatter(
                [p[cost] for p in chosen], [p["metric"] for p in chosen], color=_COLOURS[key], label=LABELS[key]
            )
        for p in chosen:
            axes.annotate(p["model"], (p[cost], p["metric"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if front:
        xs, ys = [p[cost] for p in front], [p["metric"] for p in front]
        axes.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front")
        axes.scatter(xs, ys, s=120, facecolors="none", edgecolors="black")
    return _save_log_x(figure, axes, xlabel, f"{metric} (validation)", title, path, title_size=9)
