"""Plots of early exit (PNG files, drawn on matplotlib's Agg canvas): accuracy against speed-up, one line per curve or
policy, and the per-layer exit histograms."""

from pathlib import Path

from .extras import require


def _agg_figure(feature: str):
    """matplotlib's `Figure`, drawn on an Agg canvas: the object-oriented API, no pyplot, so the caller's backend and
    figures (a notebook's, say) are left alone."""
    require("matplotlib", extra="plots", feature=feature)
    from matplotlib.figure import Figure

    return Figure


def plot_tradeoff(curves: dict[str, list], path, full_accuracy: float | None = None,
                  speedup: str = "layer", title: str = "DE3 early exit: accuracy against layer speed-up") -> Path:
    """Draws accuracy against speed-up, one line per curve (a curve of one point, such as the oracle's, as a star),
    and saves it as a PNG.

    Args:
        curves: `{label: points}`, e.g. `{"lam=1": result.curve}`.
        path: the PNG file to write.
        full_accuracy: drawn as a dashed line for the full model when given.
        speedup: the x axis: `"layer"` (docs/method.md eq. 12) or `"flops"` (points need `flops_speedup`).
        title: of the figure.

    Returns:
        The path written.

    Raises:
        ImportError: without matplotlib (`pip install "de3-transformers[plots]"`).
        ValueError: if `curves` is empty or `speedup` is unknown.
    """
    Figure = _agg_figure("plot_tradeoff")
    if not curves:
        raise ValueError("curves is empty; pass {label: tradeoff_curve(...)}.")
    if speedup not in ("layer", "flops"):
        raise ValueError(f"speedup={speedup!r} is unknown; choose 'layer' or 'flops'.")
    attribute = "speedup" if speedup == "layer" else "flops_speedup"
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for label, points in curves.items():
        points = sorted(points, key=lambda point: getattr(point, attribute))
        style = {"marker": "*", "markersize": 10, "linestyle": "none"} if len(points) == 1 else \
            {"marker": ".", "markersize": 3, "linewidth": 1.2}
        axes.plot([getattr(point, attribute) for point in points], [point.accuracy for point in points],
                  label=str(label), **style)
    if full_accuracy is not None:
        axes.axhline(full_accuracy, color="gray", linestyle="--", linewidth=1, label="full model")
    axes.set_xlabel(f"{'layer' if speedup == 'layer' else 'FLOPs'} speed-up (x)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def plot_policy_comparison(curves: dict[str, list], path, full_accuracy: float | None = None,
                           speedup: str = "layer", title: str | None = None) -> Path:
    """Accuracy against speed-up (`"layer"` or `"flops"`), one line per policy, single points (the oracle) as stars.

    Raises:
        ImportError: without matplotlib (the `plots` extra). ValueError: for empty curves or an unknown `speedup`.
    """
    return plot_tradeoff(curves, path, full_accuracy=full_accuracy, speedup=speedup,
                         title=title or "Exit policies: accuracy against speed-up")


def plot_exit_histograms(histograms: dict[str, dict[int, int]], path, title: str = "Exit layers") -> Path:
    """Bar chart of [`exit_histogram`] results, one group of bars per exit layer, one colour per label.

    Raises:
        ImportError: without matplotlib (the `plots` extra). ValueError: for no histograms.
    """
    Figure = _agg_figure("plot_exit_histograms")
    if not histograms:
        raise ValueError("histograms is empty; pass {label: exit_histogram(...)}.")
    figure = Figure(figsize=(6, 3.5), dpi=120)
    axes = figure.add_subplot()
    width = 0.8 / len(histograms)
    for offset, (label, counts) in enumerate(histograms.items()):
        layers = list(counts)
        positions = [index + offset * width for index in range(len(layers))]
        axes.bar(positions, list(counts.values()), width=width, label=label)
    axes.set_xticks([index + 0.4 - width / 2 for index in range(len(layers))], [str(layer) for layer in layers])
    axes.set_xlabel("exit layer")
    axes.set_ylabel("samples")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
    return Path(path)


__all__ = ["plot_exit_histograms", "plot_policy_comparison", "plot_tradeoff"]
