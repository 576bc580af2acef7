"""Tiles/s of ``medvision features`` end to end against the encoder alone on the same tiles and batches.

Builds a few Aperio SVS slides from the real H&E tiles (``build_slide_set``: JPEG-tiled level 0 at
0.25 µm/px with 4x and 16x levels), then for each encoder and precision:

- **encoder alone**: every tile the pipeline keeps, read beforehand into memory by the pipeline's own reader
  function as its uint8 batches (``--batch-size`` a batch within a slide, the slide's last one shorter), through
  ``PatchEncoder.embed`` (the function ``features`` calls), timed;
- **pipeline**: ``extract_features`` on the folder (slides found, opened and their tissue detected in the
  crash-isolated pool, tiles read by the run's one pool of reader processes (``--ways``) while the encoder
  runs, one HDF5 file written per slide), timed from its first slide to its last file
  (``ScoreSummary.seconds``: the encoder is loaded before; the pools' start-up is inside), into a fresh
  folder. Both are warm: the encoder has embedded one batch, and the process has run ``extract_features`` once
  (one tile a slide) before, which starts the forkserver and imports medvision and torch in it. That one-off
  start is timed and printed on its own (``first_call_s``).

Both run with malloc reusing freed memory (``runtime.reuse_freed_memory``, which every task's ``setup`` sets;
``benchmarks/cpu_allocator.py`` measures what it changes).

The ratio pipeline/encoder is the share of the encoder's own throughput the pipeline keeps (the issue's bar:
at least 0.90): the median pipeline rate over the median encoder rate, and each round's own ratio (pipeline over
the encoder-alone run just before it) as a range, which shows how much the machine moved. On a CPU the readers
share the encoder's cores, so the script also times **the reader alone**:
that reading beforehand (``TileReader.read_at``: the JPEG tiles decoded straight from the file, then resized),
in one process, as CPU ms a tile. With the encoder on ``T`` threads at
``E`` tiles/s (``1000 T / E`` core-ms a tile), the ratio cannot pass ``bound = 1 / (1 + reader_ms E / 1000 T)``
on this machine even with perfect overlap. Beside a GPU the readers have cores of their own, and ``W`` of them
supply at most ``1000 W / reader_ms`` tiles/s (one process's rate, its best case: the slide's JPEG tiles stay in
its LRU from one row of cells to the next), so there ``bound = min(1, 1000 W / (reader_ms E))``. Encoders:
``timm:tf_efficientnet_lite0`` with its real ImageNet weights (a fast encoder, the
hard case for the pipeline) and UNI's architecture (ViT-L/16, built as its card says, random weights: real
UNI weights are gated and not available here; the compute is the same). Each figure is the median of
``--rounds`` alternating rounds. Both sides run on the device ``extract_features`` picks (CUDA when there is
one). A GPU embeds a few slides in a second or two, where the pipeline's start (its pools, the first slide's
tissue detection) weighs; ``--copies`` runs each built slide several times under other names, for a run long
enough to show the steady rate.

On a CPU the readers take turns with the encoder (they read while it waits for a batch: ``extract_features(turns=)``);
``--ways 2:on,2:off,1:off`` runs the pipeline three ways in each round (2 readers in turns, 2 and 1 reading any
time; the default is ``auto:on``, what ``features`` does). The
column *forward time in the pipeline* is the time spent in the encoder's forward passes during the pipeline run
over that during the encoder-alone run (same batches): above 1, the readers slowed the encoder itself.

``--jpeg-shrink on,off`` runs both ways of decoding JPEG tiles (``data.slides.jpeg_shrink``) in each round, each
with its own encoder-alone run on its own tiles and its own reader-alone figure.

    python benchmarks/feature_throughput.py [--slides 4] [--size 6144 4608] [--encoders timm:tf_efficientnet_lite0,uni]
        [--copies 1] [--ways auto:on,1:off] [--jpeg-shrink on,off]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from machine import cpu_info, print_table, write_csv
from safetensors.torch import save_file

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.models.encoders import EncoderSpec, PatchEncoder, encoder_spec, load_encoder
from medvision.recipe import SlidesConfig
from medvision.runtime import reader_processes, resolve_amp, resolve_device, reuse_freed_memory
from medvision.tasks.features import extract_features
from medvision.wsi.source import plan_slide
from medvision.wsi.synthetic import build_slide_set
from medvision.wsi.tiles import SlideRef, TileReader, subsample

SHARED = Path(os.environ.get("MEDVISION_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def checkpoint(name: str, folder: Path) -> Path:
    """The real ImageNet weights for the timm encoder (when ``../shared`` has them); the card's architecture with
    random weights otherwise, which computes exactly as much."""
    if name == "timm:tf_efficientnet_lite0":
        real = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
        if real.is_file():
            return real
        print(f"{real} not found: tf_efficientnet_lite0 with random weights (same compute)")
    spec = encoder_spec(name)
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def kept_batches(folder: Path, cfg: SlidesConfig, batch_size: int) -> tuple[list[np.ndarray], float]:
    """The batches ``features`` will embed: every kept tile, read by the pipeline's own reader function
    (``TileReader.read_at``, tiles (H, W, 3) as read) in the same order, batched within each slide as the pipeline
    batches them; and the CPU ms a tile that reading took in this one process (the reader alone). A copy of a slide
    (``--copies``: the same file under another name) gives that slide's batches again, read once."""
    batches, spent, n = [], 0.0, 0
    seen: dict[int, list[np.ndarray]] = {}
    for path in sorted(folder.glob("*.svs")):
        inode = path.stat().st_ino
        if inode in seen:
            batches += seen[inode]
            continue
        slide, grid = plan_slide(path, cfg)
        slide.close()
        keep = subsample(grid.coords, cfg.max_tiles_per_slide, path.name)
        ref = SlideRef(path=str(path), mpp=cfg.mpp, level=grid.level, read_size=grid.read_size)
        reader = TileReader([ref], np.zeros(0, np.int64), np.zeros((0, 2), np.int64), cfg.tile_size, cfg.backend,
                            jpeg_shrink=cfg.jpeg_shrink)  # fmt: skip
        start = time.process_time()
        tiles = [reader.read_at(0, x, y) for x, y in grid.coords[keep].tolist()]
        spent += time.process_time() - start
        n += len(tiles)
        reader.close()
        seen[inode] = [np.stack(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
        batches += seen[inode]
    return batches, 1000.0 * spent / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(6144, 4608))
    ap.add_argument("--encoders", default="timm:tf_efficientnet_lite0,uni")
    ap.add_argument("--max-tiles", type=int, nargs="*", default=[0, 24],
                    help="tile cap per slide for each encoder (0: all), in --encoders order")  # fmt: skip
    ap.add_argument("--amp", default="none,auto", help="precisions, comma separated")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--copies", type=int, default=1,
                    help="each slide this many times (hard links, other names): longer runs")  # fmt: skip
    ap.add_argument("--ways", default="auto:on",
                    help="pipeline settings to run in each round, comma separated, each READERS:TURNS: READERS a "
                         "number or auto (features' default), TURNS on (features' default: readers beside a CPU "
                         "encoder read while it waits) or off (any time)")  # fmt: skip
    ap.add_argument("--jpeg-shrink", default="on",
                    help="on (features' default: JPEG tiles read at least twice the tile's side are shrunk in the "
                         "decoder), off (full-size decode and area averaging), or on,off: both in each round, "
                         "each with its own encoder-alone run on its own tiles")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="feature-throughput-"))
    try:
        build_slide_set(SHARED / "data" / "he_tiles", root / "slides", n_slides=args.slides, size=tuple(args.size),
                        mpp=0.25, formats=("aperio",), seed=0)  # fmt: skip
        for extra in ("manifest.csv", "truth.json"):
            (root / "slides" / extra).unlink()
        for path in sorted((root / "slides").glob("*.svs")):
            for k in range(1, args.copies):
                os.link(path, path.with_name(f"{path.stem}-copy{k}.svs"))
        device = resolve_device("auto")  # as extract_features' setup("auto"): both sides on the same device
        ways = [(reader_processes(device) if w == "auto" else int(w), t)
                for w, t in (way.split(":") for way in args.ways.split(","))]  # fmt: skip
        workers = ways[0][0]
        reuse_freed_memory()  # as every task's setup() does: the encoder alone runs with the pipeline's malloc
        rows = []
        machine = f"{cpu_info()}; torch {torch.__version__}, timm {timm.__version__}"
        if device.type == "cuda":
            machine += f"; {torch.cuda.get_device_name(device)}"
        print(f"machine: {machine}; {torch.get_num_threads()} torch threads; readers and turns {ways}")
        for e, name in enumerate(args.encoders.split(",")):
            weights = checkpoint(name, root)
            encoder, _ = load_encoder(name, weights)
            encoder = encoder.to(device)
            spec = encoder.spec
            cap = args.max_tiles[e] if e < len(args.max_tiles) and args.max_tiles[e] else None
            cfgs = {shrink: SlidesConfig(tile_size=spec.tile_size, target_mpp=spec.mpp or 0.5,
                                         max_tiles_per_slide=cap, jpeg_shrink=shrink == "on")
                    for shrink in args.jpeg_shrink.split(",")}  # fmt: skip
            read = {shrink: kept_batches(root / "slides", c, args.batch_size) for shrink, c in cfgs.items()}
            n_tiles = sum(len(b) for b in next(iter(read.values()))[0])
            cfg = next(iter(cfgs.values()))
            threads = torch.get_num_threads()
            # the process's first run starts the forkserver (it imports medvision and torch) and its pools: timed
            # once here, on one tile a slide, and then warm for the measured runs, as the encoder is warmed up
            start = time.perf_counter()
            extract_features(root / "slides", root / "warm", name, weights, slides=cfg.model_copy(
                update={"max_tiles_per_slide": 1}), workers=workers)  # fmt: skip
            first_call = time.perf_counter() - start
            shutil.rmtree(root / "warm")
            print(f"{name}: first call in this process (one tile a slide) {first_call:.1f} s", flush=True)
            for amp_name in args.amp.split(","):
                amp = resolve_amp(amp_name, device)
                encoder.embed(read[next(iter(read))][0][:1], device, amp)  # warm-up
                alone: dict[str, list[float]] = {shrink: [] for shrink in cfgs}
                piped: dict[tuple[str, tuple[int, str]], list[float]] = {(sh, w): [] for sh in cfgs for w in ways}
                forward: dict[tuple[str, tuple[int, str]], list[float]] = {
                    (sh, w): [] for sh in cfgs for w in [(0, "alone"), *ways]
                }
                for r in range(args.rounds):
                    for shrink, slides_cfg in cfgs.items():
                        with ForwardClock() as clock:
                            encoder.embed(read[shrink][0], device, amp)
                        alone[shrink].append(n_tiles / clock.wall)
                        forward[shrink, (0, "alone")].append(clock.seconds)
                        for way in ways:
                            out = root / f"out-{r}"
                            with ForwardClock() as clock:
                                summary = extract_features(
                                    root / "slides",
                                    out,
                                    name,
                                    weights,
                                    slides=slides_cfg,
                                    amp=amp_name,
                                    batch_size=args.batch_size,
                                    workers=way[0],
                                    turns=way[1] == "on",
                                )
                            assert summary.ok_images == n_tiles, (summary.ok_images, n_tiles)
                            piped[shrink, way].append(summary.ok_images / summary.seconds)
                            forward[shrink, way].append(clock.seconds)
                            shutil.rmtree(out)
                for shrink in cfgs:
                    for way in ways:
                        rows.append(result_row(name, amp, way, n_tiles, alone[shrink], piped[shrink, way],
                                               forward[shrink, (0, "alone")], forward[shrink, way], read[shrink][1],
                                               threads, first_call, device, spec, args.slides * args.copies,
                                               args.batch_size) | {"jpeg_shrink": shrink})  # fmt: skip
                        print(rows[-1], flush=True)
        heads = ["encoder", "precision", "tiles", "JPEG shrink", "readers", "turns", "encoder alone (tiles/s)",
                 "`medvision features` (tiles/s)", "ratio", "ratio in each round",
                 "forward time in the pipeline (x alone)", "reader (CPU ms a tile)", "bound on the ratio"]  # fmt: skip
        print_table(heads, [[r["encoder"], r["precision"], r["tiles"], r["jpeg_shrink"], r["workers"], r["turns"],
                             r["encoder_tiles_s"], r["pipeline_tiles_s"], f"{r['ratio']:.2f}",
                             f"{r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}",
                             r["forward_in_pipeline_x"] or "n/a", f"{r['reader_ms']:.2f}",
                             f"{r['bound']:.2f}"] for r in rows])  # fmt: skip
        write_csv(args.csv, rows, machine)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ForwardClock:
    """Wall seconds of the block, and the seconds spent in ``PatchEncoder.forward`` within it (any encoder: the
    pipeline loads its own). Only a CPU figure: on a GPU the call returns before its kernels have run."""

    def __init__(self) -> None:
        self.seconds, self.wall, self.original = 0.0, 0.0, PatchEncoder.forward

    def __enter__(self) -> ForwardClock:
        def timed(encoder: PatchEncoder, tiles: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return self.original(encoder, tiles)
            finally:
                self.seconds += time.perf_counter() - start

        PatchEncoder.forward = timed  # type: ignore[method-assign]
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        PatchEncoder.forward = self.original  # type: ignore[method-assign]


def result_row(name: str, amp: str, way: tuple[int, str], n_tiles: int, alone: list[float], piped: list[float],
               forward_alone: list[float], forward_piped: list[float], read_ms: float, threads: int, first_call: float,
               device: torch.device, spec: EncoderSpec, slides: int, batch: int) -> dict[str, object]:  # fmt: skip
    """One CSV row: the medians, each round's pipeline over the encoder-alone run just before it, the forward
    passes' time in the pipeline over theirs alone (CPU only), and the bound."""
    a, p = statistics.median(alone), statistics.median(piped)
    slower = statistics.median(forward_piped) / statistics.median(forward_alone) if device.type == "cpu" else None
    paired = [q / b for q, b in zip(piped, alone, strict=True)]
    workers, turns = way
    return {"encoder": name, "precision": amp, "turns": turns, "slides": slides, "tiles": n_tiles,
            "tile_px": spec.tile_size, "input_px": spec.input_size, "encoder_tiles_s": round(a, 2),
            "pipeline_tiles_s": round(p, 2), "ratio": round(p / a, 3),
            "forward_in_pipeline_x": round(slower, 3) if slower is not None else None,
            "round_ratio_min": round(min(paired), 3), "round_ratio_max": round(max(paired), 3),
            "reader_ms": round(read_ms, 2),
            # on a CPU the readers share the encoder's cores; beside a GPU they have their own, and
            # supply at most workers x 1000 / reader_ms tiles/s (one process's figure, its best case)
            "bound": round(1.0 / (1.0 + read_ms * a / (1000.0 * threads)), 3) if device.type == "cpu"
            else round(min(1.0, workers * 1000.0 / read_ms / a), 3),
            "device": device.type, "first_call_s": round(first_call, 1), "workers": workers,
            "batch": batch}  # fmt: skip


if __name__ == "__main__":
    main()
