"""Latency against throughput, drawn with matplotlib (imported when a plot is drawn): the
chart of `meshserve bench plot` and the one `meshserve bench compare` leaves beside its
report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshserve.tools.compare_tables import best_batch, latency_of, rps_of


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(axis: Any, xlabel: str, ylabel: str, legend_size: int) -> None:
    """Labels, a logarithmic latency axis, a light grid and the legend."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=legend_size)


def _save(plt: Any, figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_results(results: list[dict], path: Path) -> None:
    """p50 and p99 latency against throughput, one line per (model, transport, target)."""
    plt = _pyplot()
    series: dict[tuple[str, str, str], list[dict]] = {}
    for result in results:
        key = (result["model"], result["transport"], result["target"])
        series.setdefault(key, []).append(result)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (model, transport, target), points in sorted(series.items()):
        points.sort(key=lambda r: r["throughput_rps"])
        x = [r["throughput_rps"] for r in points]
        for quantile, style in (("p50", "-"), ("p99", "--")):
            axis.plot(x, [r["latency_ms"][quantile] for r in points], style, marker="o",
                      label=f"{model} {transport} {quantile} ({target})")
    _finish(axis, "throughput (requests/s)", "latency (ms)", 7)
    _save(plt, figure, path)


def p99_by_model(results: Mapping[tuple[str, str, int, str], dict],
                 limits: Mapping[str, Mapping[int, Mapping]], path: Path) -> str:
    """p99 latency against throughput per model, a line per (server, transport) and the
    in-process limit as a vertical line, if matplotlib is importable; says what it did."""
    try:
        plt = _pyplot()
    except ImportError:
        return "matplotlib is not importable: no plot (pip install matplotlib to get one)"
    models = list(dict.fromkeys(key[1] for key in results))
    if not models:
        return "no results to plot"
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        series: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        for (server, name, concurrency, transport), result in results.items():
            rps, p99 = rps_of(result), latency_of(result, "p99")
            if name == model and rps is not None and p99 is not None:
                series.setdefault((server, transport), []).append((rps, p99, concurrency))
        for (server, transport), points in sorted(series.items()):
            points.sort(key=lambda p: p[2])
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      label=f"{server} {transport}")
            for rps, p99, concurrency in points:
                axis.annotate(f"c={concurrency}", (rps, p99), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        limit = limits.get(model)
        if limit:
            axis.axvline(best_batch({b: v["rows_per_s"] for b, v in limit.items()})[1],
                         color="grey", linestyle="--", label="in-process limit")
        axis.set_title(model)
        _finish(axis, "throughput (req/s)", "p99 latency (ms)", 8)
    _save(plt, figure, path)
    return f"plot: {path}"
