"""A slide's tile probabilities drawn over its thumbnail, with a colour bar (one PNG per scored slide)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def probability_grid(coords: np.ndarray, probs: np.ndarray, side0: float, size0: tuple[int, int],
                     scale: float | tuple[float, float]) -> np.ndarray:  # fmt: skip
    """An (H, W) float map at ``scale`` of level 0 (one number, or (x, y): a thumbnail's sides are rounded apart),
    each tile's probability over its square, NaN elsewhere."""
    w0, h0 = size0
    sx, sy = np.broadcast_to(np.asarray(scale, np.float64), (2,)).tolist()  # one number (NumPy's too), or (x, y)
    h, w = max(1, round(h0 * sy)), max(1, round(w0 * sx))
    grid = np.full((h, w), np.nan, np.float32)
    for (x, y), p in zip(coords.tolist(), probs.tolist(), strict=True):
        x0, y0 = round(x * sx), round(y * sy)
        x1, y1 = max(x0 + 1, round((x + side0) * sx)), max(y0 + 1, round((y + side0) * sy))
        grid[y0:y1, x0:x1] = p
    return grid


def heatmap_figure(thumbnail: np.ndarray, grid: np.ndarray, title: str, label: str) -> Figure:
    """The figure :func:`plot_heatmap` saves. The thumbnail and the map are drawn over one extent, the thumbnail's
    ``(0, w, h, 0)`` (pixel edges, not centres), so a tile's square sits on the tile in the thumbnail whatever the
    map's own size."""
    h, w = thumbnail.shape[:2]
    extent = (0, w, h, 0)
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=100)
    ax.imshow(thumbnail, extent=extent)
    shown = ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55, extent=extent,
                      interpolation="nearest")  # fmt: skip
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_heatmap(path: Path, thumbnail: np.ndarray, grid: np.ndarray, title: str, label: str) -> Path:
    """Thumbnail with the probability map on top (transparent where there is no tile) and a colour bar."""
    fig = heatmap_figure(thumbnail, grid, title, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
