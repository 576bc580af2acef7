"""The feature cache: one HDF5 file per slide with its tiles' embeddings and where each tile came from.

``medvision features`` writes a file per slide and ``data.source: slide_features`` reads them back, so a
slide is embedded once and every MIL model and fold after that takes seconds. The layout follows the
reference pipelines (CLAM's ``features``/``coords`` datasets, TRIDENT's ``coords`` attributes), so their
readers open these files too; they look a slide's file up by its name without the slide's suffix
(``slide_000.h5``), where this cache keeps the slide's whole relative path (``slide_000.svs.h5``):

- ``features`` (n, d) float32: tile ``i``'s embedding, from the frozen encoder.
- ``coords`` (n, 2) int64: the level-0 (x, y) of tile ``i``'s top-left corner; attributes
  ``patch_size`` (the tile side in pixels at ``target_mpp``), ``patch_size_level0`` (the side in level-0
  pixels, rounded to an int as TRIDENT writes it and as ``read_region`` takes it) and
  ``patch_size_level0_exact``, ``level``, and TRIDENT's ``level0_magnification`` and ``target_magnification``
  (``10 / µm per pixel``), ``overlap``, ``level0_width``, ``level0_height`` and ``name`` (the slide's file
  name without its suffix).
- ``tissue`` (n,) float32: tile ``i``'s tissue fraction in the tissue mask.
- file attributes: ``format``, ``encoder``, ``encoder_sha256``, ``dim``, ``tile_size``, ``target_mpp``,
  ``mpp`` (the slide's level-0 µm/px) and ``mpp_source``, ``tissue_mm2``, ``min_tissue`` and ``tissue_method``
  (which tiles were kept), and ``preprocessing`` (JSON: the encoder's input size, resize, interpolation, mean and std,
  pooling and precision, and the stain normaliser's reference when one was used).

Nothing from the slide's own metadata is stored (no file name of the scan, no vendor fields): the
file is keyed by the slide's path relative to the folder that was embedded, which the caller chooses.
A file is written to a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.errors import MedvisionError
from medvision.io.files import atomic_write

FORMAT = "medvision.features/1"
SUFFIX = ".h5"
#: Attributes every feature file carries (the reader checks them; callers may add more).
REQUIRED = ("format", "slide", "encoder", "encoder_sha256", "dim", "tile_size", "target_mpp", "mpp")
#: Attributes stored as JSON text (a dict or a list); every other attribute is read back as it was stored, so a
#: slide path such as ``[x]/c.tif`` stays a string.
JSON_ATTRS = ("preprocessing", "slide_size")


class FeatureFileError(MedvisionError, ValueError):
    """A feature file that is missing, damaged, of another format, or inconsistent with the others."""


@dataclass
class SlideFeatures:
    """One slide's tiles: embeddings, level-0 corners, tissue fractions and the file's attributes."""

    features: np.ndarray
    coords: np.ndarray
    tissue: np.ndarray
    attrs: dict[str, Any]
    side0: float
    """Tile side in level-0 pixels (``coords/patch_size_level0``)."""

    @property
    def encoder(self) -> str:
        return str(self.attrs["encoder"])


#: Bytes a flattened slide path may take (:func:`flat_name`): with a suffix such as ``.geojson`` and
#: :func:`~medvision.io.files.atomic_write`'s temporary ``.<name>.XXXXXXXX.tmp``, well under NAME_MAX (255).
MAX_NAME_BYTES = 200
#: Hex digits of the path's SHA-256 that end a shortened name.
NAME_HASH = 16


def flat_name(rel: str, suffix: str = "") -> str:
    """The file name of what is written per slide for the slide at ``rel`` (relative to the folder scanned): its
    path flattened (``a/b.svs`` -> ``a__b.svs``), then ``suffix``. The one naming of ``features``' ``.h5`` files and
    of ``score``'s per-slide GeoJSON, heatmap and tile table.

    A flattened path of more than :data:`MAX_NAME_BYTES` bytes (UTF-8) keeps its first characters and ends with
    ``~`` and :data:`NAME_HASH` hex digits of the SHA-256 of the whole relative path, so a deeply nested slide gets
    a name the file system takes, and two long paths that share their beginning keep two names.

    Two paths can flatten to one name (``a/b.tif`` and ``a__b.tif``): each caller makes the later slide an error
    row naming both (:func:`~medvision.tasks.score.outputs.unique_names`).
    """
    flat = rel.replace("\\", "__").replace("/", "__")
    encoded = flat.encode("utf-8", "surrogateescape")
    if len(encoded) <= MAX_NAME_BYTES:
        return flat + suffix
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:NAME_HASH]
    budget, head = MAX_NAME_BYTES - NAME_HASH - 1, []
    for char in flat:  # whole characters: a name cut inside a UTF-8 sequence would not decode
        budget -= len(char.encode("utf-8", "surrogateescape"))
        if budget < 0:
            break
        head.append(char)
    return f"{''.join(head)}~{digest}{suffix}"


def feature_name(rel: str) -> str:
    """The cache file of the slide at ``rel`` (relative to the embedded folder): its path, flattened
    (:func:`flat_name`). The reader checks the file's ``slide`` attribute against the row that points at it."""
    return flat_name(rel, SUFFIX)


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, tissue: np.ndarray, side0: float,
                   level: int, attrs: dict[str, Any]) -> None:  # fmt: skip
    """Writes one slide's feature file atomically (see the module docstring for the layout).

    Raises:
        ValueError: shapes that disagree, a non-finite embedding, or a missing required attribute.
    """
    import h5py

    feats = np.ascontiguousarray(features, dtype=np.float32)
    xy = np.ascontiguousarray(coords, dtype=np.int64)
    if feats.ndim != 2 or xy.shape != (len(feats), 2) or np.shape(tissue) != (len(feats),):
        raise ValueError(f"{path}: features {feats.shape}, coords {xy.shape} and tissue {np.shape(tissue)} must be "
                         "(n, d), (n, 2) and (n,)")  # fmt: skip
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise ValueError(f"{path}: tile {bad} at {xy[bad].tolist()} has a non-finite embedding")
    missing = [k for k in REQUIRED if k not in attrs and k not in ("format", "dim")]
    if missing:
        raise ValueError(f"{path}: feature file attributes {missing} are required")
    nested = [k for k, v in attrs.items() if isinstance(v, dict | list) and k not in JSON_ATTRS]
    if nested:
        raise ValueError(f"{path}: attributes {nested} are dicts or lists; only {list(JSON_ATTRS)} are stored as JSON")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=feats)
            c = fh.create_dataset("coords", data=xy)
            c.attrs["patch_size"] = int(attrs["tile_size"])
            c.attrs["patch_size_level0"] = round(float(side0))  # an int, as TRIDENT writes it: read_region's size
            c.attrs["patch_size_level0_exact"] = float(side0)
            c.attrs["level"] = int(level)
            # TRIDENT's other coords attributes, so its readers (and its re-embedding with another encoder) take
            # the tiles: magnification as it counts it, 10 / (µm per pixel)
            c.attrs["level0_magnification"] = 10.0 / float(attrs["mpp"])
            c.attrs["target_magnification"] = 10.0 / float(attrs["target_mpp"])
            c.attrs["overlap"] = 0
            if "slide_size" in attrs:
                c.attrs["level0_width"], c.attrs["level0_height"] = (int(v) for v in attrs["slide_size"])
            c.attrs["name"] = Path(str(attrs["slide"])).stem
            fh.create_dataset("tissue", data=np.asarray(tissue, np.float32))
            for key, value in {**attrs, "format": FORMAT, "dim": int(feats.shape[1])}.items():
                fh.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value

    atomic_write(Path(path), write)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_features(path: Path) -> SlideFeatures:
    """Reads a file written by :func:`write_features`, checking its format and shapes.

    Raises:
        FeatureFileError: the file is missing, not HDF5, another format, or inconsistent.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no feature file (run `medvision features` on the slides first)")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: _attr(v) for k, v in fh.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise FeatureFileError(f"{path}: format {attrs.get('format')!r}, expected {FORMAT!r}")
            feats = np.asarray(fh["features"][()], np.float32)
            coords = np.asarray(fh["coords"][()], np.int64)
            kept = fh["coords"].attrs  # the exact side; files before it have only patch_size_level0, a float then
            side0 = float(kept["patch_size_level0_exact"] if "patch_size_level0_exact" in kept else
                          kept["patch_size_level0"])  # fmt: skip
            tissue = np.asarray(fh["tissue"][()], np.float32) if "tissue" in fh else np.ones(len(feats), np.float32)
        for key in JSON_ATTRS:  # dicts and lists were stored as JSON text
            if key in attrs:
                attrs[key] = json.loads(attrs[key])
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise FeatureFileError(f"{path}: not a readable feature file ({type(err).__name__}: {err})") from None
    missing = [k for k in REQUIRED if k not in attrs]
    if missing:
        raise FeatureFileError(f"{path}: attributes {missing} are missing")
    n, dim = len(feats), attrs["dim"]
    if not isinstance(dim, int) or feats.ndim != 2 or coords.shape != (n, 2) or feats.shape[1] != dim:
        raise FeatureFileError(f"{path}: features {feats.shape} and coords {coords.shape} disagree with "
                               f"dim {attrs['dim']}; expected (n, dim) and (n, 2)")  # fmt: skip
    if tissue.shape != (n,):
        raise FeatureFileError(f"{path}: tissue {tissue.shape} for {n} tiles; expected ({n},), one value a tile")
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise FeatureFileError(f"{path}: tile {bad} at {coords[bad].tolist()} has a non-finite embedding; expected "
                               "finite values (the writer refuses them: the file was altered)")  # fmt: skip
    return SlideFeatures(feats, coords, tissue, attrs, side0)


#: The attributes of a feature file that say how its bags were made (encoder, weights, tiling, the tissue threshold
#: and method that chose the tiles, preprocessing): what a cohort records of its first file, and compares.
EXTRACTION_KEYS = ("encoder", "encoder_sha256", "dim", "tile_size", "target_mpp", "min_tissue", "tissue_method",
                   "preprocessing")  # fmt: skip


def same_extraction(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings (:data:`EXTRACTION_KEYS`) on which two feature files differ: bags that may not be mixed. A file
    that does not record a setting differs from one that does."""
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in EXTRACTION_KEYS if a.get(k) != b.get(k)]
