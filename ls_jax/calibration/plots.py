"""Reliability diagrams of equal-width bins as PNG files (matplotlib, imported when drawing)."""

import numpy as np

from ls_jax.calibration.bins import CalibrationBins, bin_edges, errors_from_bins


def _draw_reliability(top, bottom, bins: CalibrationBins, title: str | None, ceiling: float | None) -> None:
    """One reliability diagram of equal-width ``bins`` on the axes ``top`` (accuracy per bin, the
    gap to the mean confidence, the diagonal, an optional vertical confidence ``ceiling``) and
    ``bottom`` (sample counts)."""
    bins = CalibrationBins(*(np.asarray(x) for x in bins))
    n_bins = len(bins.count) - 1
    count = bins.count.astype(np.float64)
    acc = bins.correct_sum / np.maximum(count, 1.0)
    conf = bins.confidence_sum / np.maximum(count, 1.0)
    edges = bin_edges(n_bins).astype(np.float64)
    left, width, full = edges[:-1], 1.0 / n_bins, count[:-1] > 0
    ece = float(errors_from_bins(bins)["ece"])
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.bar(left[full], acc[:-1][full], width=width, align="edge", edgecolor="k", color="tab:blue", label="accuracy")
    top.bar(
        left[full],
        (conf - acc)[:-1][full],
        bottom=acc[:-1][full],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    if count[-1] > 0:
        top.plot([1.0], [acc[-1]], "o", color="tab:purple", label="confidence = 1.0")
    if ceiling is not None:
        top.axvline(ceiling, color="tab:green", lw=1.5, label=f"smoothing ceiling {ceiling:.4f}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=7)
    top.set_title(f"{title + ': ' if title else ''}ECE = {ece:.4f} (n = {int(count.sum())}, {n_bins} bins)", fontsize=9)
    bottom.bar(left, count[:-1], width=width, align="edge", edgecolor="k", color="tab:gray")
    if count[-1] > 0:
        bottom.bar([1.0], [count[-1]], width=width / 4, color="tab:purple")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")


def reliability_diagram(bins: CalibrationBins, path, *, title: str | None = None, ceiling: float | None = None) -> str:
    """Write a reliability diagram PNG of equal-width bins.

    Top: per-bin accuracy bars over ``[k / n, (k + 1) / n)``, the gap to the mean confidence
    in red, the diagonal; a non-empty "exactly 1.0" bin is a point at x = 1. Bottom: the sample
    count per bin. Title: the ECE (and ``title`` before it).

    Args:
      bins: :class:`CalibrationBins`, ``[n_bins + 1]`` per field (equal-width).
      path: the PNG file to write.
      title: optional text before the ECE in the title.
      ceiling: optional vertical line at the highest confidence the training target allows
        (label smoothing: ``1 - a + a / V``).

    Returns:
      ``str(path)``.

    Examples:
      >>> import os, tempfile
      >>> from ls_jax.calibration import bin_statistics, reliability_diagram
      >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=5)
      >>> path = reliability_diagram(bins, os.path.join(tempfile.mkdtemp(), "rel.png"), title="demo")
      >>> os.path.basename(path), os.path.getsize(path) > 0
      ('rel.png', True)
    """
    return reliability_diagrams([[(title, bins, ceiling)]], path)


def reliability_diagrams(grid, path) -> str:
    """Write a PNG of reliability diagrams side by side (panels as in :func:`reliability_diagram`).

    Args:
      grid: rows of panels, each a list of ``(title, bins, ceiling)`` (a shorter row leaves its
        last cells blank).
      path: the PNG file to write.

    Returns:
      ``str(path)``.

    Examples:
      >>> import os, tempfile
      >>> from ls_jax.calibration import bin_statistics, reliability_diagrams
      >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=5)
      >>> grid = [[("a = 0", bins, None), ("a = 0.1", bins, 0.9)]]
      >>> path = reliability_diagrams(grid, os.path.join(tempfile.mkdtemp(), "both.png"))
      >>> os.path.getsize(path) > 0
      True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(grid), max(len(row) for row in grid)
    fig = Figure(figsize=(5.0 * n_cols, 6.0 * n_rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * n_rows, n_cols, squeeze=False, gridspec_kw={"height_ratios": [3, 1] * n_rows})
    for r in range(n_rows):
        for c in range(n_cols):
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            if c < len(grid[r]):
                bottom.sharex(top)
                _draw_reliability(top, bottom, grid[r][c][1], grid[r][c][0], grid[r][c][2])
            else:
                top.axis("off")
                bottom.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)
