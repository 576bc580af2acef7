"""Scoring whole slides: ``medvision score SLIDES_DIR --model RUN --out slides.csv`` for a slide-trained run.

Every entry under ``SLIDES_DIR`` ends up in exactly one row of ``slides.csv``:

- ``ok``: the slide's probabilities (its tiles aggregated as the run was evaluated: mean, max, top-k
  or the run's ABMIL head), a 0/1 call at each of the run's slide-level operating points, the number
  of tiles used, the tissue area in mm² and the MPP used (with where it came from);
- ``error``: a slide that cannot be read (unknown format, damaged file, no MPP, no tissue, a reader
  that raised, crashed or hung), with the reason;
- ``skipped``: not a slide (a file without a slide suffix), with the reason.

A slide is a file with a slide suffix (``.svs``, ``.ndpi``, ``.mrxs``, ``.tif``, ...) or a folder of
DICOM instances (a DICOM WSI series; not searched further). Opening a slide and finding its tissue
run in an isolated worker process (:mod:`medvision.workers`), so a reader that segfaults or hangs on
one file costs that slide only; its tiles are then read by DataLoader workers with a timeout.

Besides the table: ``<out>.tiles.parquet`` (one row per tile: slide, level-0 x and y, tile side at
level 0, tissue fraction, probabilities) and ``<out>.heatmaps/<slide>.png``. A slide's tile file and
heatmap are written before its row, so a row means the slide is complete; re-running with the same
``--out`` resumes after a kill. Nothing from the slides' metadata is written but geometry and MPP:
no Aperio ``Filename``/``User``, no DICOM patient tags.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medvision.data.dataset import prepare
from medvision.data.transforms import build_transforms
from medvision.evaluation import Decision
from medvision.io.files import atomic_write
from medvision.metrics import aggregate_by_group
from medvision.recipe import SlidesConfig
from medvision.runs import RunError, ScoringSpec, versions
from medvision.runtime import barrier, broadcast, gather, setup
from medvision.tasks.score import (
    Engine,
    ScoreSummary,
    _resume,
    in_shard,
    load_scorer,
    merge_parts,
    operating_calls,
    part_path,
)
from medvision.workers import Failure, PoolStats, isolated_map
from medvision.wsi.heatmap import plot_heatmap, probability_grid
from medvision.wsi.slide import SLIDE_SUFFIXES, SlideError, is_dicom_slide_dir
from medvision.wsi.tiles import SlideRef, TileReader, grid_from_json, grid_to_json, subsample

log = logging.getLogger("medvision")
#: Seconds one slide may take to open and find its tissue, and one batch of tiles to be read.
SLIDE_TIMEOUT, TILE_BATCH_TIMEOUT = 600.0, 300.0
THUMBNAIL = 1024
WORKER_PRELOAD = ("medvision.wsi.source", "medvision.tasks.score_slides", "medvision.cli")  # see medvision.tasks.score


def find_slides(folder: Path) -> list[tuple[str, str, str]]:
    """``(relative path, outcome, reason)`` of every entry, sorted: ``candidate`` slides and ``skipped`` others."""
    if not folder.is_dir():
        raise RunError(f"{folder}: slides folder does not exist")
    found: list[tuple[str, str, str]] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        mrxs = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        keep = []
        for d in sorted(dirs):
            if d in mrxs:
                continue  # a MIRAX slide's data folder belongs to its .mrxs file
            if is_dicom_slide_dir(here / d):
                found.append((str((here / d).relative_to(folder)), "candidate", ""))
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            rel = str((here / f).relative_to(folder))
            if here == folder and is_dicom_slide_dir(folder):
                found.append((rel, "skipped", "the folder itself is one DICOM series; pass its parent folder"))
            elif f.lower().endswith(SLIDE_SUFFIXES):
                found.append((rel, "candidate", ""))
            else:
                found.append((rel, "skipped", f"not a slide (suffix {Path(f).suffix or 'none'!r}; expected one of "
                                              f"{', '.join(SLIDE_SUFFIXES)} or a DICOM series folder)"))  # fmt: skip
    return sorted(found)


_PLAN: dict[str, Any] = {}


def _init_planner(root: str, slides: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _PLAN.update(root=Path(root), cfg=SlidesConfig.model_validate(slides))


def _plan_chunk(rels: list[str]) -> list[dict[str, Any] | str]:
    """Opens each slide and finds its tissue; an error of any kind is that slide's reason, as a string."""
    from medvision.wsi.source import plan_slide

    out: list[dict[str, Any] | str] = []
    for rel in rels:
        try:
            slide, grid = plan_slide(_PLAN["root"] / rel, _PLAN["cfg"])
            try:
                thumb = slide.thumbnail(THUMBNAIL)
                info = {"grid": grid_to_json(grid), "thumbnail": thumb, "size0": slide.level_dimensions[0],
                        "mpp_source": slide.mpp_source}  # fmt: skip
            finally:
                slide.close()
            out.append(info)
        except KeyboardInterrupt:
            raise
        except SlideError as err:
            out.append(str(err).replace(str(_PLAN["root"] / rel), rel))
        except BaseException as err:
            out.append(f"{rel}: slide reader failed ({type(err).__name__}: {err})")
    return out


class _Tiles(Dataset[torch.Tensor]):
    """One slide's tiles, preprocessed exactly as the run's evaluation tiles were."""

    def __init__(self, reader: TileReader, spec: ScoringSpec) -> None:
        self.reader, self.spec = reader, spec
        self.transform = build_transforms(None, spec.image_size, spec.mean, spec.std, normalize=False)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.spec
        return prepare(self.reader(i), s.intensity, s.in_chans, self.transform, s.transfer)  # type: ignore[arg-type]


@dataclass
class _Slide:
    rel: str
    status: str
    reason: str = ""
    probs: np.ndarray | None = None
    info: dict[str, Any] | None = None


def _columns(spec: ScoringSpec, calls: list[tuple[str, float]]) -> list[str]:
    return ["path", "status", "reason", "pred", *[f"prob_{c}" for c in spec.classes], *[n for n, _ in calls],
            "tiles", "tissue_mm2", "mpp", "mpp_source", "target_mpp", "level"]  # fmt: skip


def _safe_name(rel: str) -> str:
    return rel.replace(os.sep, "__").replace("/", "__")


def score_slides(
    folder: Path, model: Path, out: Path, shard: tuple[int, int] = (0, 1), batch_size: int | None = None,
    workers: int | None = None, engine: str = "torch", slide_timeout: float = SLIDE_TIMEOUT, heatmaps: bool = True,
) -> ScoreSummary:  # fmt: skip
    """Scores every slide under ``folder`` with a slide-trained run; see the module docstring.

    Examples:
        >>> score_slides(Path("/data/slides"), Path("runs/camelyon"), Path("slides.csv")).line()
    """
    start = time.perf_counter()
    d, _ = setup("auto")
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    from medvision.models.slide_head import MIL_FILE

    if engine != "torch" and (model / MIL_FILE).is_file():
        raise RunError("this run aggregates tiles with its ABMIL head, which needs tile features: use --engine torch")
    scorer, spec, provenance = load_scorer(model, engine)
    if spec.inputs != "slides":
        raise RunError(f"{model}: this run was not trained on slides (data.source {spec.inputs}); use score on images")
    cfg = SlidesConfig.model_validate(spec.slides)
    decision = Decision.from_json(spec.decision)
    head = _mil_head(model, spec, engine)
    from medvision.wsi.source import stain_transform

    stain = stain_transform(cfg)  # fitted once, to the run's reference tile
    entries = [e for e in find_slides(folder) if in_shard(e[0], shard)]
    if d.world_size > 1:
        i, n = shard
        mine = [e for e in entries if in_shard(e[0], (i + n * d.rank, n * d.world_size))]
        table = part_path(out, d.rank, d.world_size)
    else:
        mine, table = entries, out
    tiles_dir = Path(f"{out}.tiles")
    heat_dir = Path(f"{out}.heatmaps")
    done = _resume(table)
    todo = [e for e in mine if e[0] not in done]
    summary = ScoreSummary(already_done=len(done & {e[0] for e in mine}), shard=f"{shard[0]}/{shard[1]}",
                           out=str(out), engine=scorer.name, item="tile")  # fmt: skip
    calls = operating_calls(decision, "patient")  # the slide level's, chosen on validation slides
    columns = _columns(spec, calls)
    new = not table.is_file() or table.stat().st_size == 0
    table.parent.mkdir(parents=True, exist_ok=True)
    stats = PoolStats()
    with table.open("a", newline="") as fh:
        if new:
            csv.writer(fh).writerow(columns)
        results = _planned(folder, todo, cfg, n_workers, slide_timeout, stats)
        for item in tqdm(results, total=len(todo), desc="slides", unit="slide", disable=None):
            if item.status == "ok":
                assert item.info is not None
                try:
                    _score_one(folder, item, cfg, spec, scorer, head, stain, batch_size or 32, n_workers, tiles_dir,
                               heat_dir if heatmaps else None, decision)  # fmt: skip
                except Exception as err:  # a tile reader that raised, died or hung: this slide's row says so
                    why = f"{type(err).__name__}: {err}"
                    item.status, item.reason = "error", f"{item.rel}: tiles could not be read ({why})"
            fh.write(_row(item, spec, calls, decision, cfg))
            fh.flush()
            summary.scored_now += 1
            summary.images_now += int(item.info["n_tiles"]) if item.status == "ok" and item.info else 0
    per_rank = gather((summary.images_now, summary.scored_now, summary.already_done, stats.crashed_files,
                       stats.timed_out_files), d)  # fmt: skip
    if per_rank is not None:
        (summary.images_now, summary.scored_now, summary.already_done, summary.crashed_files,
         summary.timed_out_files) = (sum(c) for c in zip(*per_rank, strict=True))  # fmt: skip
        if d.world_size > 1:
            merge_parts([part_path(out, r, d.world_size) for r in range(d.world_size)], [e[0] for e in entries], out)
            provenance["world_size"] = d.world_size
        summary.seconds = time.perf_counter() - start
        summary.images_per_second = summary.images_now / summary.seconds if summary.seconds else 0.0
        _tally(out, {e[0] for e in entries}, summary)
        _merge_tiles(out, tiles_dir)
        record = {**provenance, "model_sha256": spec.model_sha256, "recipe_sha256": spec.recipe_sha256,
                  "versions": versions(), "aggregate": spec.aggregate, "slides": spec.slides,
                  "calibration_temperature": decision.temperature, "tta": spec.tta,
                  "operating_points": decision.points.get("patient"),
                  **asdict(summary), "reconciled": summary.reconciled, "exit_code": summary.exit_code}  # fmt: skip
        Path(f"{out}.json").write_text(json.dumps(record, indent=2) + "\n")
    summary = broadcast(summary, d)
    barrier(d)
    return summary


def _planned(folder: Path, todo: list[tuple[str, str, str]], cfg: SlidesConfig, workers: int, timeout: float,
             stats: PoolStats) -> Iterator[_Slide]:  # fmt: skip
    candidates = [rel for rel, outcome, _ in todo if outcome == "candidate"]
    planned = isolated_map(_plan_chunk, candidates, workers=min(workers, 2), timeout=timeout, chunk=1,
                           initializer=_init_planner, initargs=(str(folder), cfg.model_dump(mode="json")),
                           preload=WORKER_PRELOAD, stats=stats)  # fmt: skip
    for rel, outcome, reason in todo:
        if outcome != "candidate":
            yield _Slide(rel, outcome, reason)
            continue
        got_rel, result = next(planned)
        assert got_rel == rel
        if isinstance(result, Failure):
            yield _Slide(rel, "error", f"{rel}: {result.reason}")
        elif isinstance(result, str):
            yield _Slide(rel, "error", result)
        else:
            yield _Slide(rel, "ok", info=result)


def _mil_head(model: Path, spec: ScoringSpec, engine: str) -> Any:
    if spec.aggregate != "abmil":
        return None
    if engine != "torch":
        raise RunError("this run aggregates tiles with its ABMIL head, which needs tile features: use --engine torch")
    from medvision.models.mil import load_abmil
    from medvision.models.slide_head import MIL_FILE

    if not (model / MIL_FILE).is_file():
        raise RunError(f"{model}: evaluation.patient_aggregate is abmil but {MIL_FILE} is missing")
    return load_abmil(model / MIL_FILE)[0]


def _score_one(folder: Path, item: _Slide, cfg: SlidesConfig, spec: ScoringSpec, scorer: Engine, head: Any, stain: Any,
               batch_size: int, workers: int, tiles_dir: Path, heat_dir: Path | None,
               decision: Decision) -> None:  # fmt: skip
    """Reads the slide's tiles, scores them, aggregates, and writes its tile table and heatmap."""
    assert item.info is not None
    grid = grid_from_json(item.info["grid"])
    keep = subsample(grid.coords, cfg.max_tiles_per_slide, item.rel)
    coords, tissue = grid.coords[keep], grid.tissue[keep]
    item.info.update(n_tiles=len(coords), tissue_mm2=grid.tissue_area_mm2, mpp=grid.mpp, level=grid.level)
    if len(coords) == 0:
        item.status = "error"
        item.reason = (f"{item.rel}: no tile with at least {cfg.min_tissue:.0%} tissue at {cfg.target_mpp} µm/px "
                       f"(tissue area {grid.tissue_area_mm2:.2f} mm²)")  # fmt: skip
        return
    ref = SlideRef(path=str(folder / item.rel), mpp=cfg.mpp, level=grid.level, read_size=grid.read_size)
    reader = TileReader([ref], np.zeros(len(coords), np.int64), coords, cfg.tile_size, cfg.backend, transform=stain)
    loader = DataLoader(_Tiles(reader, spec), batch_size=batch_size, num_workers=workers,
                        timeout=TILE_BATCH_TIMEOUT if workers else 0)  # fmt: skip
    probs, feats = [], []
    for batch in loader:
        x = batch.numpy()
        n = len(x)
        if n < batch_size:  # fixed batch shape: a tile's probability does not depend on its batch mates
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        if head is not None:
            p, f = scorer.predict_with_features(x)
            feats.append(f[:n])
        else:
            p = scorer.predict(x)
        probs.append(p[:n])
    tile_probs = np.concatenate(probs).astype(np.float64)
    if head is not None:
        from medvision.metrics import softmax
        from medvision.models.mil import predict_abmil

        slide_p = softmax(predict_abmil(head, [np.concatenate(feats)])[0])[0]
    else:
        _, _, agg, _ = aggregate_by_group(["s"] * len(tile_probs), np.zeros(len(tile_probs), np.int64), tile_probs,
                                          spec.aggregate, spec.top_k)  # fmt: skip
        slide_p = agg[0]
    item.probs = slide_p
    _write_tiles(tiles_dir / f"{_safe_name(item.rel)}.parquet", item.rel, coords, grid.side0, tissue, tile_probs, spec)
    if heat_dir is not None:
        k = decision.positive if decision.positive is not None else (1 if len(spec.classes) > 1 else 0)
        thumb = item.info["thumbnail"]
        scale = thumb.shape[1] / item.info["size0"][0]
        hm = probability_grid(coords, tile_probs[:, k], grid.side0, tuple(item.info["size0"]), scale)
        title = f"{item.rel}: P({spec.classes[k]}) = {slide_p[k]:.3f} ({spec.aggregate}, {len(coords)} tiles)"
        plot_heatmap(heat_dir / f"{_safe_name(item.rel)}.png", thumb, hm, title, f"tile P({spec.classes[k]})")


def _write_tiles(path: Path, rel: str, coords: np.ndarray, side0: float, tissue: np.ndarray, probs: np.ndarray,
                 spec: ScoringSpec) -> None:  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"slide": pa.array([rel] * len(coords), pa.string()), "x": pa.array(coords[:, 0], pa.int64()),
            "y": pa.array(coords[:, 1], pa.int64()), "side_level0": pa.array(np.full(len(coords), side0), pa.float64()),
            "tissue": pa.array(tissue, pa.float32())}  # fmt: skip
    for j, c in enumerate(spec.classes):
        cols[f"prob_{c}"] = pa.array(probs[:, j].astype(np.float32), pa.float32())
    atomic_write(path, lambda tmp: pq.write_table(pa.table(cols), tmp))


def _merge_tiles(out: Path, tiles_dir: Path) -> None:
    """All slides' tile tables as one ``<out>.tiles.parquet``, in slide order (the per-slide files stay, for resume)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(tiles_dir.glob("*.parquet")) if tiles_dir.is_dir() else []
    if not parts:
        return
    merged = pa.concat_tables([pq.read_table(p) for p in parts])
    atomic_write(Path(f"{out}.tiles.parquet"), lambda tmp: pq.write_table(merged, tmp))


def _row(item: _Slide, spec: ScoringSpec, calls: list[tuple[str, float]], decision: Decision,
         cfg: SlidesConfig) -> str:  # fmt: skip
    buf = io.StringIO()
    blank = [""] * (len(spec.classes) + len(calls))
    reason = " | ".join(line.strip() for line in item.reason.splitlines() if line.strip())
    if item.status != "ok" or item.probs is None or item.info is None:
        csv.writer(buf).writerow([item.rel, item.status, reason, "", *blank, "", "", "", "", cfg.target_mpp, ""])
        return buf.getvalue()
    p, info = item.probs, item.info
    flags = [str(int(p[decision.positive] >= thr)) for _, thr in calls] if decision.positive is not None else []
    csv.writer(buf).writerow([item.rel, "ok", "", spec.classes[int(p.argmax())], *[f"{v:.6f}" for v in p], *flags,
                              info["n_tiles"], f"{info['tissue_mm2']:.3f}", f"{info['mpp']:.6g}", info["mpp_source"],
                              cfg.target_mpp, info["level"]])  # fmt: skip
    return buf.getvalue()


def _tally(table: Path, found: set[str], summary: ScoreSummary) -> None:
    status: dict[str, str] = {}
    tiles: dict[str, int] = {}
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["path"] in found:
                status[row["path"]] = row["status"]
                tiles[row["path"]] = int(row["tiles"] or 0) if row["status"] == "ok" else 0
    summary.files_found = len(found)
    summary.ok_files = sum(s == "ok" for s in status.values())
    summary.ok_images = sum(tiles.values())
    summary.error_files = sum(s == "error" for s in status.values())
    summary.skipped_files = sum(s == "skipped" for s in status.values())
