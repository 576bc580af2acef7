"""Where the tissue is: a boolean mask from a low-resolution image of the slide (pure functions).

Glass is bright and grey; stained tissue is coloured (H&E is pink to purple). The mask is Otsu's
threshold on HSV saturation (or on optical density, which also keeps dark tissue of little colour, such
as faded or grey stains, that saturation misses; pale pink tissue, under the OD floor, is found by
saturation only), then pen marks removed, then morphological closing and opening and removal of specks
smaller than ``min_area_px``. Otsu always splits an image in two, so it is trusted only where one of its
classes is glass: the threshold never goes below a floor (an image of glass only stays glass), and where
even Otsu's lower class is mostly above the floor (an image of tissue only, or a flat colour) the floor
itself is the threshold, so tissue is not split into a light and a dark half. Everything works on the
thumbnail: at 8 µm/px a 25 x 25 mm slide is ~3000 px.

Pen marks (a pathologist's blue, green or black marker on the glass) are saturated or dark, so
Otsu keeps them; they are told apart by colour. Hematoxylin is blue-purple but keeps red above
green (R > G); blue ink has B far above R and G close to or above R; green ink has G above both;
black ink is dark in every channel. Red ink is not excluded: it cannot be told from eosin by colour.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

TissueMethod = Literal["saturation", "od"]

#: Below these Otsu is not trusted (an image of glass only): saturation on 0-255, optical density.
SATURATION_FLOOR = 20
OD_FLOOR = 0.15


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0-255 (uint8), from OpenCV."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]


def optical_density(rgb: np.ndarray, io: float = 255.0) -> np.ndarray:
    """Mean optical density over the channels, ``-log10((I + 1) / io)`` (Beer-Lambert)."""
    od = -np.log10((rgb.astype(np.float32) + 1.0) / io)
    return np.clip(od, 0.0, None).mean(axis=2)


def otsu_threshold(values: np.ndarray, floor: float) -> float:
    """Otsu's threshold of ``values`` (any range), never below ``floor``; ``floor`` itself where the values Otsu
    puts below its threshold have their median above ``floor`` (no glass to split off: see the module docstring).
    Values above the threshold are tissue."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return floor
    scaled = np.round((values - lo) / (hi - lo) * 255).astype(np.uint8)
    t, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(floor, lo + float(t) / 255.0 * (hi - lo))
    below = values[values <= threshold]
    return floor if below.size and float(np.median(below)) > floor else threshold


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink (see the module docstring for why these rules)."""
    r, g, b = (rgb[:, :, i].astype(np.int16) for i in range(3))
    blue = (b > r + 40) & (g >= r - 10) & (b > 90)
    green = (g > r + 20) & (g > b + 10)
    black = (r < 50) & (g < 50) & (b < 50)
    return blue | green | black


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def tissue_mask(
    rgb: np.ndarray,
    method: TissueMethod = "saturation",
    close_px: int = 2,
    open_px: int = 2,
    min_area_px: int = 64,
    exclude_pen: bool = True,
) -> np.ndarray:
    """Boolean (H, W) tissue mask of an RGB uint8 low-resolution image of a slide.

    Args:
        rgb: the thumbnail, RGB uint8.
        method: ``saturation`` (Otsu on HSV saturation) or ``od`` (Otsu on optical density).
        close_px: radius of the closing that fills gaps between cells and nuclei.
        open_px: radius of the opening that removes dust and thin debris.
        min_area_px: connected regions smaller than this many pixels are dropped.
        exclude_pen: remove marker ink, and a margin of ``close_px`` around it.

    Examples:
        >>> mask = tissue_mask(slide.thumbnail(2048))
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs an RGB uint8 (H, W, 3) image; got {rgb.dtype} {rgb.shape}")
    if method == "saturation":
        values = saturation(rgb).astype(np.float32)
        mask = values > otsu_threshold(values, SATURATION_FLOOR)
    elif method == "od":
        values = optical_density(rgb)
        mask = values > otsu_threshold(values, OD_FLOOR)
    else:
        raise ValueError(f"tissue method {method!r} is not one of 'saturation', 'od'")
    if exclude_pen:
        pen = pen_mask(rgb)
        if close_px:
            pen = cv2.dilate(pen.astype(np.uint8), _disk(close_px)).astype(bool)
        mask &= ~pen
    m: np.ndarray = mask.astype(np.uint8)
    if close_px:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(close_px))
    if open_px:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(open_px))
    if exclude_pen:
        m[pen] = 0  # closing must not bridge back over the ink
    if min_area_px > 1:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
        m = keep[labels].astype(np.uint8)
    return m.astype(bool)


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of ``True`` in each (x0, y0, x1, y1) box of ``mask`` coordinates (half-open; clipped).

    An integral image makes this O(1) a box, so a slide's 100,000 candidate tiles cost milliseconds.
    """
    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    b = np.asarray(boxes, dtype=np.float64)
    x0 = np.clip(np.floor(b[:, 0]), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(b[:, 1]), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil(b[:, 2]), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil(b[:, 3]), 0, h).astype(np.int64)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where((x1 > x0) & (y1 > y0), inside / area, 0.0)
