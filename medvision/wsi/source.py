"""``data.source: slides``: a CSV of whole slides becomes a sample table of tissue tiles.

The manifest has ``slide_path,label`` and optional ``patient_id`` and ``split`` columns (paths
relative to the CSV; a DICOM WSI is the folder of its series). Every tile inherits its slide's
label (weak supervision). Splits are grouped by patient, or by slide when there is no patient id,
so no patient's tiles are on both sides of a split; predictions are aggregated per slide
(``SampleTable.units``).

Tissue detection runs once per slide and setting; its grid is cached in the run's cache folder,
keyed by the slide file's size and modification time, so evaluate and later runs skip it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medvision.data.table import (
    AuditRow,
    DataSourceError,
    SampleTable,
    check_split,
    class_index,
    read_manifest,
    slide_rows,
)
from medvision.io.files import atomic_write, sha256
from medvision.recipe import DataConfig, SlidesConfig
from medvision.runs import RunError
from medvision.wsi.slide import Slide, SlideError, open_slide
from medvision.wsi.tiles import (
    SlideRef,
    TileGrid,
    TileReader,
    TileSpec,
    grid_from_json,
    grid_to_json,
    plan_tiles,
    subsample,  # fmt: skip
)

log = logging.getLogger("medvision")


def tile_spec(cfg: SlidesConfig) -> TileSpec:
    return TileSpec(tile_size=cfg.tile_size, target_mpp=cfg.target_mpp, min_tissue=cfg.min_tissue,
                    tissue_method=cfg.tissue_method, tissue_mpp=cfg.tissue_mpp)  # fmt: skip


def _file_stamp(path: Path) -> list[int]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return [v for f in files if f.is_file() for v in (f.stat().st_size, f.stat().st_mtime_ns)]


def plan_slide(path: Path, cfg: SlidesConfig, cache_dir: Path | None = None) -> tuple[Slide, TileGrid]:
    """Opens a slide and finds its tissue tiles (from the cache when this slide and setting were seen before).

    Raises:
        SlideError: the slide cannot be read, has no MPP, or the target magnification is finer than the scan.
    """
    slide = open_slide(path, cfg.mpp, cfg.backend)
    spec = tile_spec(cfg)
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([str(path.resolve()), _file_stamp(path), asdict(spec), slide.mpp]).encode())
        cached = cache_dir / "slide-grids" / f"{path.stem[:40]}-{key.hexdigest()[:16]}.json"
        if cached.is_file():
            try:
                return slide, grid_from_json(json.loads(cached.read_text()))
            except (ValueError, KeyError):
                log.warning("%s: unreadable tile-grid cache, detecting tissue again", cached)
    try:
        grid = plan_tiles(slide, spec)
    except Exception:
        slide.close()
        raise
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(grid_to_json(grid))

        def write(tmp: str) -> None:
            Path(tmp).write_text(text)

        atomic_write(cached, write)
    return slide, grid


def stain_fingerprint(cfg: SlidesConfig) -> str | None:
    """SHA-256 of the stain reference file, None without one: what a feature folder, a tile cache and a scoring
    run compare, because a path can hold other pixels tomorrow (and a relative one others elsewhere)."""
    if not cfg.stain_reference:
        return None
    try:
        return sha256(Path(cfg.stain_reference))
    except OSError as err:
        raise DataSourceError(f"data.slides.stain_reference {cfg.stain_reference}: cannot be read ({err})") from None


def check_stain_reference(where: Path | str, slides: SlidesConfig, recorded: str | None) -> None:
    """Slides are stain-normalised to the pixels the run (or feature folder) recorded, not to whatever the path
    holds now: the reference's SHA-256 must be ``recorded``, and a recorded SHA-256 needs a reference path (without
    one the slides would silently go unnormalised). Nothing is checked where nothing was recorded (older runs).

    Raises:
        RunError: naming ``where``, the reference file and the recorded and current SHA-256.
    """
    if not recorded:
        return
    if not slides.stain_reference:
        raise RunError(f"{where}: its tiles were stain-normalised to a reference with SHA-256 {recorded[:16]}…, but "
                       "its slides section names no stain_reference: new slides would be read without stain "
                       "normalisation; set slides.stain_reference to the path of that reference tile")  # fmt: skip
    try:
        now = stain_fingerprint(slides)
    except DataSourceError as err:
        raise RunError(
            f"{where}: its tiles were stain-normalised to a reference that cannot be read now ({err})"
        ) from None
    if now != recorded:
        raise RunError(f"{where}: its tiles were stain-normalised to {slides.stain_reference} with SHA-256 "
                       f"{recorded[:16]}…; that file now has {str(now)[:16]}…: put back the reference the run was "
                       "made with (a replaced reference changes every normalised pixel)")  # fmt: skip


def stain_transform(cfg: SlidesConfig) -> Any:
    """The Macenko normaliser fitted to ``stain_reference``, or None when the recipe names no reference."""
    if not cfg.stain_reference:
        return None
    from medvision.wsi.stain import MacenkoNormalizer, load_reference

    try:
        return MacenkoNormalizer(load_reference(cfg.stain_reference))
    except ValueError as err:
        raise DataSourceError(f"data.slides.stain_reference {cfg.stain_reference}: {err}") from None


def load_slide_table(path: Path, cfg: DataConfig, cache_dir: Path | None = None) -> SampleTable:
    """One row per tissue tile of every slide in the manifest at ``path``; see the module docstring.

    Every row gets an audit row: a slide that cannot be opened, or has no tile with enough tissue, is an
    error that names the manifest line (``data.on_error`` decides whether the run stops or goes on without it).

    Raises:
        DataSourceError: a row with an unknown label or split, or a slide listed twice; the message says
            which, on which line (a slide that cannot be used is an audit error, see :func:`load_table`).
    """
    rows = read_manifest(path, ("slide_path", "label"))
    classes = cfg.classes if cfg.classes is not None else sorted({(r["label"] or "").strip() for r in rows})
    base = path.parent
    sc = cfg.slides
    refs: list[SlideRef] = []
    ids: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    units: list[str] = []
    splits: list[str] = []
    slide_index: list[np.ndarray] = []
    coords: list[np.ndarray] = []
    audit: list[AuditRow] = []
    all_splits: list[str] = []
    progress = tqdm(rows, desc="tissue", unit="slide", leave=False, disable=None)
    for line, where, rel, row in slide_rows(path, progress):
        full = Path(rel) if Path(rel).is_absolute() else base / rel
        label = class_index(classes, (row["label"] or "").strip(), where)
        split = check_split(row.get("split"), where)
        all_splits.append(split)
        row_name = f"{path.name}, line {line}"
        try:
            slide, grid = plan_slide(full, sc, cache_dir)
            slide.close()
        except SlideError as err:
            audit.append(AuditRow(rel, "error", f"{row_name}: {str(err).replace(str(full), rel)}"))
            continue
        keep = subsample(grid.coords, sc.max_tiles_per_slide, rel)
        if len(keep) == 0:
            why = (
                f"{row_name}: no tile with at least {sc.min_tissue:.0%} tissue at {sc.target_mpp} µm/px "
                f"(tissue area {grid.tissue_area_mm2:.2f} mm²); check the slide, or lower data.slides.min_tissue"
            )
            audit.append(AuditRow(rel, "error", why))
            continue
        s = len(refs)
        refs.append(SlideRef(path=str(full), mpp=sc.mpp, level=grid.level, read_size=grid.read_size))
        xy = grid.coords[keep]
        n = len(xy)
        ids += [f"{rel}@{x},{y}" for x, y in xy.tolist()]
        labels += [label] * n
        groups += [(row.get("patient_id") or "").strip() or rel] * n
        units += [rel] * n
        splits += [split] * n
        slide_index.append(np.full(n, s, np.int64))
        coords.append(xy)
        audit.append(AuditRow(rel, "used", "", n))
    if any(all_splits) and not all(all_splits):
        raise DataSourceError(f"{path}: 'split' is empty on some rows and set on others; fill all or none")
    if not refs:
        raise DataSourceError(f"{path}: no slide with tissue tiles could be read", audit=audit)
    tile_cache = (cache_dir / "tiles") if (sc.tile_cache and cache_dir is not None) else None
    stain = stain_transform(sc)
    reader = TileReader(refs, np.concatenate(slide_index), np.concatenate(coords), sc.tile_size, sc.backend,
                        tile_cache, stain, cache_key=str(stain_fingerprint(sc)),
                        jpeg_shrink=sc.jpeg_shrink)  # fmt: skip
    log.info("slides %s: %d slides, %d tissue tiles of %d px at %g µm/px", path, len(refs), len(ids),
             sc.tile_size, sc.target_mpp)  # fmt: skip
    return SampleTable(ids=ids, labels=np.asarray(labels, dtype=np.int64), groups=groups, splits=splits,
                       classes=classes, loader=reader, grayscale=False, origin=str(path), units=units,
                       audit=audit, pixel_dtypes=frozenset({"uint8"}))  # fmt: skip
