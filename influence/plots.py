"""The pictures stages write beside their tables: clustering sweeps and confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from influence.runs import atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(sweep: pd.DataFrame, k: int, name: str, out: Path) -> None:
    """elbow.png (inertia and GMM BIC against k) and silhouette.png, chosen k marked."""
    _plot_against_k(sweep, k, ("inertia", "KMeans inertia", "inertia"),
                    ("gmm_bic", "GMM BIC", "tab:green"), f"{name}: elbow",
                    f"chosen k = {k} (Kneedle)", out / "elbow.png")
    _plot_against_k(sweep, k, ("silhouette", "silhouette", "silhouette (higher is better)"),
                    ("davies_bouldin", "Davies-Bouldin (lower is better)", "tab:purple"),
                    f"{name}: silhouette against k", f"chosen k = {k}", out / "silhouette.png")


def _plot_against_k(sweep: pd.DataFrame, k: int, left: tuple[str, str, str],
                    right: tuple[str, str, str], title: str, chosen: str, path: Path) -> None:
    """One sweep column (column, legend, axis label) and another on a twin axis (column, axis
    label, colour) against k, with the chosen k marked."""
    plt = _pyplot()
    column, legend, ylabel = left
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(sweep["k"], sweep[column], "o-", ms=3, label=legend)
    ax.axvline(k, color="tab:red", ls="--", label=chosen)
    ax.set(xlabel="k (clusters)", ylabel=ylabel, title=title)
    column, ylabel, colour = right
    twin = ax.twinx()
    twin.plot(sweep["k"], sweep[column], "s-", ms=3, color=colour, alpha=0.6)
    twin.set_ylabel(ylabel, color=colour)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def draw_confusion(matrix: pd.DataFrame, title: str, path: Path) -> None:
    """Row-normalised confusion matrix as a picture (counts written in when there is room).

    At most 20 inches a side at 100 dpi, its margins sized from the longest label instead of a
    layout pass: a 180-artist matrix took seconds to lay out and encode at 40 inches, as long
    as fitting its head."""
    plt = _pyplot()
    counts = matrix.to_numpy()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(matrix)
    side = min(20.0, max(6.0, 0.11 * n + 3))
    size = max(3.0, min(10.0, 0.6 * 72 * side * 0.7 / max(n, 1)))
    longest = max((len(str(v)) for v in [*matrix.index, *matrix.columns]), default=1)
    margin = min(0.4, (0.6 * size * longest / 72 + 0.5) / side)
    fig = plt.figure(figsize=(side, side))
    ax = fig.add_axes((margin, margin, 0.86 - margin, 0.9 - margin))
    bar = fig.add_axes((0.9, margin, 0.02, 0.9 - margin))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(n)
    ax.set_xticks(ticks, matrix.columns, rotation=90, fontsize=size)
    ax.set_yticks(ticks, matrix.index, fontsize=size)
    if n <= 25:
        for i, j in zip(*np.nonzero(counts), strict=True):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=size,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    fig.suptitle(title, y=0.96, fontsize=max(size, 8))
    fig.colorbar(image, cax=bar)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
