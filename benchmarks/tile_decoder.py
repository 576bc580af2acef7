"""The slide tile decoder: simplejpeg in strict mode against the decoders it replaced, on the same JPEG tiles.

Until 2026-12-05 ``TiffLevelTiles`` decoded a JPEG tile at full size with tifffile (imagecodecs' libjpeg-turbo) and
shrunk by 2, 4 or 8 with ``cv2.imdecode`` (OpenCV's libjpeg-turbo). Both return an image for a tile whose
entropy-coded data is corrupt: libjpeg only warns on stderr, and a damaged tile became a silently wrong embedding
with an ``ok`` row. simplejpeg (libjpeg-turbo's TurboJPEG API) with ``strict=True`` raises on those warnings.

For every level-0 JPEG tile of each slide (the real Aperio ``cmu_small_region.svs`` and a synthetic SVS of
YCbCr tiles built from the shared H&E tiles), at each shrink, this prints and writes (``tile_decoder.csv``):

- ms a tile, the median [min-max] of ``--rounds`` passes over all tiles, the two methods alternating;
- the largest pixel difference between the two methods (the same libjpeg-turbo: 0 expected);
- of ``--damaged`` tiles with 64 random bytes written over a random place in their scan data (every one of them
  changes the pixels), how many each method refuses; and how many clean tiles it refuses (0 expected).

    python benchmarks/tile_decoder.py [--svs PATH] [--rounds 5] [--damaged 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import tifffile
from machine import cpu_info, print_table, write_csv

from medvision.wsi.synthetic import build_slide_set
from medvision.wsi.tiles import TiffLevelTiles

SHARED = Path(__file__).resolve().parents[2] / "shared"
FORMER_SCALED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
Decode = Callable[[int, bytes], np.ndarray]


def level_tiles(path: Path) -> tuple[tifffile.TiffFile, object, list[tuple[int, bytes]]]:
    tif = tifffile.TiffFile(path)
    page = tif.series[0].levels[0].pages[0]
    fast = TiffLevelTiles(tif, page)
    tiles = [(i, data) for i in range(len(page.databytecounts)) if (data := fast.raw(i)) is not None]
    return tif, page, tiles


def decoders(tif: tifffile.TiffFile, page: object, shrink: int) -> dict[str, Decode]:
    """The former decoder and medvision's (:meth:`TiffLevelTiles.decode`, simplejpeg strict) for ``page``'s tiles at
    1/``shrink`` of their side (RGB uint8); the former decodes the same stream (``prefix``) at a shrink."""
    fast = TiffLevelTiles(tif, page, shrink=shrink)
    p: tifffile.TiffPage = page  # type: ignore[assignment]
    side = int(p.tilelength) // shrink

    def former(i: int, data: bytes) -> np.ndarray:
        if shrink == 1:
            return p.decode(data, i, jpegtables=p.jpegtables)[0].reshape(side, side, -1)[..., :3]
        tile = cv2.imdecode(np.frombuffer((fast.prefix or b"") + data[2:], np.uint8), FORMER_SCALED[shrink])
        if tile is None:
            raise ValueError("OpenCV decoded nothing")
        return tile[..., ::-1]

    return {"tifffile (full) / cv2 (shrunk)": former, "simplejpeg strict": lambda i, d: fast.decode(d, i)}


def scan_start(tile: bytes) -> int:
    i = 2
    while tile[i + 1] != 0xDA:
        i += 2 + int.from_bytes(tile[i + 2 : i + 4], "big")
    return i + 2 + int.from_bytes(tile[i + 2 : i + 4], "big")


def refuses(decode: Decode, i: int, data: bytes) -> bool:
    try:
        decode(i, data)
    except Exception:  # any decoder error is a refusal
        return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--svs", type=Path, default=Path.home() / ".cache" / "medvision-test-data" / "cmu_small_region.svs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--damaged", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tile_decoder.csv"))
    args = ap.parse_args()
    machine = cpu_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_slide_set(SHARED / "data" / "he_tiles", Path(tmp), n_slides=1, size=(4096, 3072), mpp=0.25, seed=0)
        for name, path in (("aperio cmu_small_region.svs (RGB)", args.svs),
                           ("synthetic slide_000.svs (YCbCr 4:2:0)", Path(tmp) / "slide_000.svs")):  # fmt: skip
            tif, page, tiles = level_tiles(path)
            for shrink in (1, 2, 4):
                methods = decoders(tif, page, shrink)
                times: dict[str, list[float]] = {m: [] for m in methods}
                for r in range(args.rounds):
                    for m in methods if r % 2 == 0 else reversed(list(methods)):
                        start = time.perf_counter()
                        for i, data in tiles:
                            methods[m](i, data)
                        times[m].append((time.perf_counter() - start) / len(tiles) * 1e3)
                former, strict = methods.values()
                diff = max(int(np.abs(former(i, d).astype(np.int16) - strict(i, d)).max()) for i, d in tiles)
                rng = np.random.default_rng(1)
                damaged = []
                while len(damaged) < args.damaged:
                    i, data = tiles[int(rng.integers(len(tiles)))]
                    at = int(rng.integers(scan_start(data), len(data) - 66))
                    bad = data[:at] + rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + data[at + 64 :]
                    if bad != data:
                        damaged.append((i, bad))
                base = statistics.median(times[next(iter(methods))])
                for m, decode in methods.items():
                    med = statistics.median(times[m])
                    rows.append({"slide": name, "tiles": len(tiles), "shrink": shrink, "method": m,
                                 "ms_per_tile": round(med, 4), "ms_min": round(min(times[m]), 4),
                                 "ms_max": round(max(times[m]), 4), "ratio_to_former": round(med / base, 3),
                                 "max_pixel_diff": diff,
                                 "clean_refused": sum(refuses(decode, i, d) for i, d in tiles),
                                 "damaged_refused": sum(refuses(decode, i, d) for i, d in damaged),
                                 "damaged": len(damaged)})  # fmt: skip
            tif.close()
    print(f"machine: {machine}")
    print_table(["slide", "shrink", "method", "ms/tile [min-max]", "x former", "max diff", "clean refused",
                 "damaged refused"],
                [[r["slide"], r["shrink"], r["method"], f"{r['ms_per_tile']:.3f} [{r['ms_min']:.3f}-{r['ms_max']:.3f}]",
                  r["ratio_to_former"], r["max_pixel_diff"], f"{r['clean_refused']}/{r['tiles']}",
                  f"{r['damaged_refused']}/{r['damaged']}"] for r in rows])  # fmt: skip
    write_csv(args.out, rows, machine)


if __name__ == "__main__":
    main()
