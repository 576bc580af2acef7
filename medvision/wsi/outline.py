"""The exact outline of a binary mask: polygons whose area is the mask's pixel count (pure functions).

Pixel (row ``r``, column ``c``) is the square ``[c, c + 1] x [r, r + 1]``, and the polygons trace the edges
between mask and background pixels (pixel-edge, or "crack", coordinates), so they cover exactly the union
of the mask's squares: a 4 x 4 hole has area 16, a 1-pixel strip keeps its area, and no edge is pulled in
by half a pixel as an outline through pixel centres (``cv2.findContours``) is.

Connectivity: pixels that share an edge are connected, for the mask and its background alike
(4-connectivity). That is what a polygon's interior is: two squares that meet only at a corner have no
interior in common, so OGC validity (JTS, QuPath, GEOS) leaves no other choice. Hence:

- pixels that meet only at a corner, and are joined by no path of edge neighbours, are two polygons that
  touch at that corner;
- a polygon that touches itself at a corner is a shell and a hole (or two holes) touching there.

Every ring is simple (no vertex twice), any two rings meet in isolated corner points at most, consecutive
edges turn by 90 degrees (collinear runs are merged, no spikes), and each polygon's interior is connected:
a valid polygon as JTS sees it. Vertices are integer mask-lattice positions, exterior rings
counter-clockwise and holes clockwise by the signed (shoelace) area of the raw ``(x, y)`` numbers.

How: the boundary edges are found as straight runs with numpy, each directed with the mask on its left;
at a corner where two diagonal pixels meet (a vertex with two ways out) the run that keeps hugging the same
pixel is taken, so each traced ring follows one 4-connected region; a ring that passes such a corner twice
is split there into two simple rings. Holes belong to the region whose pixels line them
(``cv2.connectedComponents``, 4-connectivity).
"""

from __future__ import annotations

import cv2
import numpy as np

#: Directions of a run in raw (x, y) numbers: +x, +y, -x, -y. ``(d + 1) % 4`` is the way out of a corner
#: where two diagonal pixels meet that keeps following the pixel the run came along.
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3

Outline = list[list[np.ndarray]]


def _runs(signed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of one non-zero value along axis 1 of an int8 array of -1, 0, 1.

    Returns each run's row, first column, one past its last column, and value.
    """
    padded = np.zeros((signed.shape[0], signed.shape[1] + 2), np.int8)
    padded[:, 1:-1] = signed
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])  # between padded columns c and c + 1: column c
    before, after = padded[rows, cols], padded[rows, cols + 1]
    opens, closes = after != 0, before != 0  # row-major, so the k-th close ends the k-th open
    return rows[opens], cols[opens], cols[closes], after[opens]


def _boundary_runs(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed straight boundary runs of the zero-padded int8 mask ``t``, the mask on the left of each.

    Returns start x, start y, end x, end y (mask lattice, unpadded) and the direction of every run.
    """
    # horizontal edges at y = row: +1 where pixel row y (below) is inside and row y - 1 (above) is not
    y, a, b, sign = _runs(t[1:, 1:-1] - t[:-1, 1:-1])
    east = sign > 0
    hx0, hx1 = np.where(east, a, b), np.where(east, b, a)
    hd = np.where(east, EAST, WEST)
    # vertical edges at x = column: +1 where pixel column x - 1 (left) is inside and column x (right) is not
    x, a, b, sign = _runs(np.ascontiguousarray((t[1:-1, :-1] - t[1:-1, 1:]).T))
    south = sign > 0
    vy0, vy1 = np.where(south, a, b), np.where(south, b, a)
    vd = np.where(south, SOUTH, NORTH)
    sx, sy = np.concatenate([hx0, x]), np.concatenate([y, vy0])
    ex, ey = np.concatenate([hx1, x]), np.concatenate([y, vy1])
    return (sx.astype(np.int64), sy.astype(np.int64), ex.astype(np.int64), ey.astype(np.int64),
            np.concatenate([hd, vd]).astype(np.int64))  # fmt: skip


def _trace(nxt: list[int], corner: list[bool], start: list[int], end: list[int], order: list[int]) -> list[list[int]]:
    """The cycles of the run permutation ``nxt``, each split where it passes a two-way corner twice.

    ``corner[i]``: run ``i`` ends at a vertex with two ways out; ``start``/``end``: vertex ids of the runs.
    A ring is cut out as soon as the walk comes back to such a vertex (inner loops first), so every
    piece visits each vertex once.
    """
    seen = bytearray(len(nxt))
    two_way = {e for e, c in zip(end, corner, strict=True) if c}
    cycles: list[list[int]] = []
    for first in order:
        if seen[first]:
            continue
        path: list[int] = []
        # two-way vertex -> (length of the path on arriving there, the run that arrived); an entry whose run
        # was cut away since is stale
        at: dict[int, tuple[int, int]] = {start[first]: (0, -1)} if start[first] in two_way else {}
        i = first
        while not seen[i]:
            seen[i] = 1
            path.append(i)
            if corner[i]:
                k, via = at.get(end[i], (-1, -1))
                if k < 0 or (k > 0 and (k > len(path) - 1 or path[k - 1] != via)):
                    at[end[i]] = (len(path), i)
                else:  # back at a corner passed before: the runs since then close a ring
                    cycles.append(path[k:])
                    del path[k:]
            i = nxt[i]
        if path:
            cycles.append(path)
    return cycles


def mask_outline(mask: np.ndarray, min_area: float = 0) -> Outline:
    """The polygons of a 2-D mask (non-zero is inside) in mask-pixel-edge coordinates; see the module docstring.

    Args:
        mask: (H, W) array; non-zero pixels are inside.
        min_area: polygons whose exterior encloses fewer pixels than this are dropped with their holes,
            and so are holes of fewer pixels.

    Returns:
        One entry per 4-connected region, in the order of their top-left pixels: the exterior ring first,
        then the holes, each an (n, 2) int64 array of (x, y) vertices, open (the first vertex is not
        repeated). The exteriors' areas minus the holes' sum to the number of mask pixels (with
        ``min_area=0``).

    Examples:
        >>> (square,) = mask_outline(np.ones((2, 3), bool))
        >>> square[0].tolist()
        [[0, 0], [3, 0], [3, 2], [0, 2]]
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_outline needs a 2-D mask; got shape {mask.shape}")
    inside = mask != 0
    w = inside.shape[1]
    sx, sy, ex, ey, d = _boundary_runs(np.pad(inside, 1).astype(np.int8))
    if len(d) == 0:
        return []
    stride = w + 1
    start, end = sy * stride + sx, ey * stride + ex
    order = np.lexsort((d, start))  # by start vertex, then direction
    by_start = start[order]
    lo = np.searchsorted(by_start, end, "left")
    two_way = np.searchsorted(by_start, end, "right") - lo == 2
    first, second = order[lo], order[np.minimum(lo + 1, len(order) - 1)]
    nxt = np.where(two_way & (d[first] != (d + 1) % 4), second, first)
    cycles = _trace(nxt.tolist(), two_way.tolist(), start.tolist(), end.tolist(), order.tolist())

    runs = np.fromiter((i for c in cycles for i in c), np.int64)
    lengths = np.fromiter((len(c) for c in cycles), np.int64, len(cycles))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x, y = sx[runs], sy[runs]
    after = np.arange(1, len(runs) + 1)
    after[offsets[1:] - 1] = offsets[:-1]
    area = np.add.reduceat(x * y[after] - x[after] * y, offsets[:-1]) // 2  # twice the area is even
    # the pixel on the left of each ring's first run, and its 4-connected region
    heads = runs[offsets[:-1]]
    hx, hy, hd = sx[heads], sy[heads], d[heads]
    px = np.where((hd == SOUTH) | (hd == WEST), hx - 1, hx)
    py = np.where((hd == WEST) | (hd == NORTH), hy - 1, hy)
    _, labels = cv2.connectedComponents(inside.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    region = labels[py, px]

    polygons: dict[int, list[np.ndarray]] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for k in np.flatnonzero(np.abs(area) >= min_area).tolist():
        ring = np.stack([x[offsets[k] : offsets[k + 1]], y[offsets[k] : offsets[k + 1]]], axis=1)
        if area[k] > 0:
            polygons[int(region[k])] = [ring]
        else:
            holes.setdefault(int(region[k]), []).append(ring)
    for label, rings in holes.items():
        if label in polygons:
            polygons[label].extend(rings)
    return list(polygons.values())
