"""``medvision features SLIDES --encoder NAME --out DIR``: each slide's tissue tiles, embedded once by a frozen encoder.

One job with ``score`` (:mod:`medvision.tasks.score.job`): the slides are found and opened the same way
(:func:`~medvision.tasks.score.slides.find_slides`, tissue detection in the crash-isolated pool), sharded by
``--shard``/torchrun, and every entry is one row of ``DIR/features.csv``:

- ``ok``: the slide's feature file (``DIR/<slide path, flattened>.h5``, :mod:`medvision.wsi.features`), its
  tile count, embedding width, tissue area, MPP and pyramid level;
- ``error``: a slide that cannot be read, has no tissue tile, or whose tiles could not be read (a reader that
  raised, crashed or hung), with the reason; ``skipped``: not a slide.

A slide's file is written (atomically) before its row, so a row means the file is complete, and a re-run with
the same ``--out`` resumes after the slides already finished: it redoes only a row cut short by a kill, an error row
of a reader that crashed or timed out, and an ``ok`` row whose ``.h5`` is missing, does not open, is another slide's
or has another tile count (:func:`stale_row`; how many is logged). One run writes a folder at a time: a second run
into it while the first runs is refused (``features.lock``). ``DIR/features.json`` records the encoder, its
checkpoint's SHA-256, the tiling and preprocessing, the slides folder (absolute), the precision and the counts; a
second run into the same folder must use the same encoder, weights, tiling and slides folder, so one folder never
mixes two feature spaces, nor two folders' slides under one name (resume would take one for the other).

Two slides whose paths flatten to one file name (``a/b.tif`` and ``a__b.tif``) would share one ``.h5``: the later
of the two (in the scan's order, after the slides already in ``features.csv``) is an error row naming both, by the
rule and the naming ``score`` uses for its per-slide files (:func:`~medvision.tasks.score.outputs.unique_names`,
:func:`~medvision.wsi.features.flat_name`; a path too long for one file name is shortened, with a hash).

Tiles are read (uint8, stain-normalised when a reference is given) by one pool of reader processes for the
whole run, which works ahead across slides while the encoder runs
(:meth:`~medvision.tasks.score.slides.SlideScan.stream`); the encoder resizes and normalises them itself
(:class:`~medvision.models.encoders.PatchEncoder`).

Examples:
    >>> extract_features(Path("/data/slides"), Path("feats/uni"), "uni", "/models/uni/pytorch_model.bin").line()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from medvision.io.archive import Entry
from medvision.models.encoders import PatchEncoder, load_encoder
from medvision.options import SLIDE_TIMEOUT
from medvision.recipe import SlidesConfig
from medvision.runs import RunError, versions
from medvision.runtime import reader_processes, resolve_amp, setup
from medvision.tasks.score.job import ScoreSummary, csv_line, one_line, run_units
from medvision.tasks.score.outputs import PlannedSlide, SlideTiles, finished_rows, unique_names
from medvision.tasks.score.slides import SlideBatches, SlideScan, find_slides
from medvision.workers import start_forkserver
from medvision.wsi.features import feature_name, write_features
from medvision.wsi.source import stain_fingerprint

TABLE, RECORD = "features.csv", "features.json"
COLUMNS = ["path", "status", "reason", "file", "tiles", "dim", "tissue_mm2", "mpp", "mpp_source", "target_mpp",
           "level", "seconds"]  # fmt: skip


def preprocessing(encoder: PatchEncoder, cfg: SlidesConfig, amp: str) -> dict[str, Any]:
    """What happens to a tile between the slide and the embedding: recorded in every feature file."""
    s = encoder.spec
    out = {"input_size": s.input_size, "resize": s.resize, "interpolation": s.interpolation,
           "mean": list(s.mean), "std": list(s.std), "pooling": s.pooling, "stain_reference": cfg.stain_reference,
           "jpeg_shrink": cfg.jpeg_shrink, "precision": amp}  # fmt: skip
    if cfg.stain_reference:  # its pixels, not only its path: a folder refuses features normalised to another tile
        out["stain_reference_sha256"] = stain_fingerprint(cfg)
    return out


class FeatureUnit(SlideScan):
    """Slides to tiles to one feature file and one row a slide (see the module docstring)."""

    drawn = False  # no heatmap or GeoJSON: planning skips the thumbnail and the tissue contours

    def __init__(self, encoder: PatchEncoder, sha256: str, cfg: SlidesConfig, out_dir: Path, device: torch.device,
                 amp: str, workers: int, timeout: float, batch_size: int, turns: bool = True) -> None:  # fmt: skip
        super().__init__(cfg, workers, timeout, turns=turns and device.type == "cpu")
        self.encoder, self.sha256, self.out_dir = encoder.to(device), sha256, out_dir
        self.device, self.amp, self.batch_size = device, amp, batch_size
        self.columns = COLUMNS
        self.settings = preprocessing(encoder, cfg, amp)

    def entries(self, folder: Path) -> list[Entry]:
        """The scan's entries, a slide whose feature file name another slide already has made an error entry."""
        return unique_names(find_slides(folder), _indexed_files(self.out_dir / TABLE), feature_name, "feature file")[0]

    def process(self, item: PlannedSlide, tiles: SlideTiles, batches: SlideBatches) -> None:
        assert item.info is not None
        cfg, grid = self.cfg, tiles.grid
        feats = self.encoder.embed(batches, self.device, self.amp)
        attrs = {"slide": item.rel, "encoder": self.encoder.spec.name, "encoder_sha256": self.sha256,
                 "tile_size": cfg.tile_size, "target_mpp": cfg.target_mpp, "mpp": float(grid.mpp),
                 "mpp_source": str(item.info["mpp_source"]), "tissue_mm2": float(grid.tissue_area_mm2),
                 "min_tissue": cfg.min_tissue, "tissue_method": cfg.tissue_method,
                 "slide_size": list(item.info["size0"]), "preprocessing": self.settings,
                 "medvision": versions().get("medvision", "")}  # fmt: skip
        path = self.out_dir / feature_name(item.rel)
        write_features(path, feats, tiles.coords, tiles.tissue, grid.side0, grid.level, attrs)

    def row(self, item: PlannedSlide, seconds: float) -> str:
        target = self.cfg.target_mpp
        if item.status != "ok" or item.info is None:
            return csv_line([item.rel, item.status, one_line(item.reason), "", "", "", "", "", "", target, "", ""])
        info = item.info
        return csv_line([item.rel, "ok", "", feature_name(item.rel), info["n_tiles"], self.encoder.dim,
                         f"{info['tissue_mm2']:.3f}", f"{info['mpp']:.6g}", info["mpp_source"], target, info["level"],
                         f"{seconds:.2f}"])  # fmt: skip

    def provenance(self) -> dict[str, Any]:
        return {"slides": self.cfg.model_dump(mode="json"), "preprocessing": self.settings}

    def owned(self) -> list[Path]:
        return [self.out_dir]  # the feature files: one run writes this folder at a time (features.lock)


def stale_row(out_dir: Path, row: dict[str, str]) -> str | None:
    """Why an ``ok`` row of ``features.csv`` cannot be kept on resume: its feature file is missing, does not open as
    one, is another slide's, or holds another number of tiles than the row says (a file deleted, replaced or damaged
    since); None for a row that matches its file, and for an error or skipped row. Only the file's attributes and
    shapes are read, not the embeddings, so checking a large folder costs seconds."""
    if row.get("status") != "ok":
        return None
    import h5py

    path = out_dir / row.get("file", "")  # an ok row names its file; without one, the folder is no file: redone
    if not path.is_file():
        return "ok rows whose feature file is missing"
    try:
        with h5py.File(path, "r") as fh:
            slide, n = fh.attrs.get("slide"), fh["features"].shape[0]
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return "ok rows whose feature file does not open"
    if (slide.decode() if isinstance(slide, bytes) else slide) != row.get("path") or str(n) != row.get("tiles"):
        return "ok rows whose feature file is another slide's or has another tile count"
    return None


def _indexed_files(table: Path) -> dict[str, str]:
    """The feature file of each slide an earlier run into this folder finished (the ok rows of ``features.csv`` and
    of its ranks' parts)."""
    return {r["path"]: r["file"] for r in finished_rows(table) if r.get("file")}


def _check_same_folder(out_dir: Path, record: dict[str, Any]) -> None:
    """A folder holds one feature space of one slides folder: a resumed or extended run must embed the same folder
    with the same encoder, weights and tiling."""
    old_path = out_dir / RECORD
    if not old_path.is_file():
        return
    old = json.loads(old_path.read_text())
    if old.get("folder") not in (None, record["folder"]):  # a record from before the folder was kept has none
        raise RunError(f"{out_dir} holds features of the slides in {old['folder']} ({old_path}), not of "
                       f"{record['folder']}: a resumed run would take same-named slides for done; give another "
                       "--out")  # fmt: skip
    keys = ("encoder", "encoder_sha256", "slides", "preprocessing")
    differ = [k for k in keys if old.get(k) != record.get(k)]
    if differ:
        raise RunError(f"{out_dir} holds features made with other settings ({', '.join(differ)} differ from "
                       f"{old_path}); give another --out")  # fmt: skip


def extract_features(
    folder: Path, out_dir: Path, encoder: str, checkpoint: str | Path | None = None, *,
    slides: SlidesConfig | None = None, batch_size: int = 32, workers: int | None = None,
    shard: tuple[int, int] = (0, 1), amp: str = "none", slide_timeout: float = SLIDE_TIMEOUT, turns: bool = True,
) -> ScoreSummary:  # fmt: skip
    """Embeds every slide under ``folder`` into ``out_dir``; see the module docstring.

    ``slides``: the tiling (default: the encoder's own tile size and magnification from its card, 50% tissue).
    ``workers``: tile-reading processes (default, :func:`~medvision.runtime.reader_processes`: on a CPU one per
    thread of the encoder, which read while it waits for a batch; beside a GPU every core but one; 0 reads in this
    process, without crash isolation). ``amp``: ``none`` (float32) or ``auto``/``bf16``/``fp16``. ``turns``:
    readers beside a CPU encoder read while it waits for a batch (False: at any time;
    ``benchmarks/feature_throughput.py`` compares both).
    """
    if not folder.is_dir():
        raise RunError(f"{folder}: slides folder does not exist")
    d, device = setup("auto")
    n_workers = reader_processes(device) if workers is None else workers
    if n_workers:
        start_forkserver()  # its start-up overlaps with loading the encoder
    net, sha = load_encoder(encoder, checkpoint)
    spec = net.spec
    cfg = slides or SlidesConfig(tile_size=spec.tile_size, target_mpp=spec.mpp or 0.5)
    precision = resolve_amp(amp, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = FeatureUnit(net, sha, cfg, out_dir, device, precision, n_workers, slide_timeout, batch_size, turns)
    record = {"encoder": spec.name, "encoder_sha256": sha, "encoder_source": spec.source, "dim": net.dim,
              "engine": "torch", "device": str(device), "amp": precision, "versions": versions(),
              "slides": cfg.model_dump(mode="json"), "preprocessing": unit.settings,
              "folder": str(folder.resolve())}  # fmt: skip
    if d.rank == 0:
        _check_same_folder(out_dir, record)
    threads = (os.cpu_count() or 1) if device.type == "cpu" else None  # readers are light: the encoder takes the cores
    summary = run_units(folder, out_dir / RECORD.replace(".json", ""), unit, shard, record, threads,
                        table_path=out_dir / TABLE, stale=lambda row: stale_row(out_dir, row))  # fmt: skip
    summary.out = str(out_dir / TABLE)
    return summary
