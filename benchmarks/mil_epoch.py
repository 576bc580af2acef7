"""Wall time of one MIL training epoch per head on the CPU: 1,000 bags of 2,000 x 1,024 float32 tile features.

A cohort of 1,000 slides with 2,000 tiles each, encoded to 1,024 features (a UNI-sized encoder), is
8 GB of float32: more than this machine should hold for a timing. The script builds a pool of
``--pool`` distinct random bags (100 by default, 0.8 GB) and cycles them to ``--bags`` bags: bag ``i``
is the same array as bag ``i % pool``, referenced again, not copied. One epoch does the same
arithmetic on a referenced bag as on a distinct one (``fit_mil`` neither copies nor caches a bag), so
the epoch's compute is that of 1,000 distinct slides; only the memory traffic is friendlier, as the
pool is re-read from RAM instead of streaming 8 GB. Labels come from a planted signal: every tile is
N(0, I), and in a positive bag (every other one) 2% of its tiles are shifted by 1.5 along one direction.

Each head (``mean``, ``abmil``, ``clam_sb``, ``transmil``) is timed with ``max_tiles_train=512`` (512 random
tiles per bag per step, the default until 2026-12-05) and with ``max_tiles_train=None`` (every tile, the
default since): one call of ``fit_mil(bags, labels, [], [], 2, cfg)`` with ``epochs=1`` and no validation bags,
after one untimed warm-up call on ``--warmup`` bags. ``fit_mil`` runs torch on ``cfg.threads`` threads,
1 by default, whatever the process's own setting. The epoch is ``history["epoch_seconds"][0]`` (the
training loop alone); the call's wall time adds the set-up, mostly one pass over every tile for the
per-feature mean and std (``tile_statistics``).

    OMP_NUM_THREADS=1 python benchmarks/mil_epoch.py [--bags 1000] [--pool 100] [--tiles 2000] [--features 1024]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_info, print_table, write_csv

from medvision.models.mil_fit import MILConfig, fit_mil

HEADS = ("mean", "abmil", "clam_sb", "transmil")


def busy_seconds() -> float:
    """CPU seconds the whole machine has used (``/proc/stat``), to tell how much others took during a run."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def make_pool(n: int, tiles: int, features: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` distinct bags of N(0, I) tiles; odd bags are positive, with 2% of their tiles shifted."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(features).astype(np.float32)
    direction *= 1.5 / np.linalg.norm(direction)
    bags, labels = [], np.arange(n) % 2
    for label in labels:
        x = rng.standard_normal((tiles, features), dtype=np.float32)
        if label:
            x[rng.choice(tiles, max(1, tiles // 50), replace=False)] += direction
        bags.append(x)
    return bags, labels


def timed_fit(bags: list[np.ndarray], labels: np.ndarray, cfg: MILConfig) -> tuple[float, float, float]:
    """Wall seconds of one ``fit_mil`` call and of its one epoch, and the cores other processes used meanwhile."""
    busy0, own0 = busy_seconds(), time.process_time()
    start = time.perf_counter()
    _, history = fit_mil(bags, labels, [], np.array([], dtype=np.int64), 2, cfg)
    seconds = time.perf_counter() - start
    other = (busy_seconds() - busy0) - (time.process_time() - own0)
    return seconds, history["epoch_seconds"][0], max(0.0, other) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=1000, help="bags in the epoch")
    parser.add_argument("--pool", type=int, default=100, help="distinct bags, cycled to --bags")
    parser.add_argument("--tiles", type=int, default=2000, help="tiles per bag")
    parser.add_argument("--features", type=int, default=1024, help="features per tile")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated MIL heads")
    parser.add_argument("--warmup", type=int, default=4, help="bags of the untimed warm-up call per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mil_epoch.csv"))
    args = parser.parse_args()
    if args.pool < 2 or args.bags < args.pool or args.warmup < 2:
        parser.error("expected --pool >= 2, --bags >= --pool and --warmup >= 2 (both classes in every call)")

    started = time.perf_counter()
    pool, pool_labels = make_pool(args.pool, args.tiles, args.features, args.seed)
    bags = [pool[i % args.pool] for i in range(args.bags)]
    labels = pool_labels[np.arange(args.bags) % args.pool]
    distinct = len({id(b) for b in bags})
    gb_pool, gb_cohort = (x * args.tiles * args.features * 4 / 1e9 for x in (args.pool, args.bags))
    print(f"{args.bags} bags of {args.tiles} x {args.features} float32 ({gb_cohort:.1f} GB if distinct): {distinct} "
          f"distinct arrays ({gb_pool:.2f} GB) each referenced {args.bags // args.pool} times; built in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip

    rows = []
    for kind in args.heads.split(","):
        for max_tiles in (512, None):
            cfg = MILConfig(head=kind, epochs=1, max_tiles_train=max_tiles, seed=args.seed)
            warm = [pool[i] for i in range(args.warmup)]
            fit_mil(warm, pool_labels[: args.warmup], [], np.array([], dtype=np.int64), 2, cfg)
            seconds, epoch, other = timed_fit(bags, labels, cfg)
            tiles = "all" if max_tiles is None else str(max_tiles)
            rows.append({"head": kind, "max_tiles_train": tiles, "bags": args.bags, "distinct_bags": distinct,
                         "tiles_per_bag": args.tiles, "features": args.features, "epoch_s": round(epoch, 1),
                         "ms_per_bag": round(epoch / args.bags * 1e3, 1), "bags_per_s": round(args.bags / epoch, 1),
                         "fit_mil_s": round(seconds, 1), "other_cores": round(other, 2),
                         "cfg_threads": cfg.threads})  # fmt: skip
            print(f"{kind} max_tiles_train={tiles}: fit_mil {seconds:.1f} s, epoch {epoch:.1f} s "
                  f"({epoch / args.bags * 1e3:.1f} ms/bag); other processes {other:.2f} cores", flush=True)  # fmt: skip

    machine = (
        f"{cpu_info()}; torch {torch.__version__}, process threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}), fit_mil threads {MILConfig().threads}"
    )
    write_csv(args.out, rows, machine)
    today = datetime.date.today().isoformat()
    print(f"\nmachine: {machine}; {today}; {time.perf_counter() - started:.0f} s in all")
    print(f"one epoch = fit_mil(epochs=1, no validation) over {args.bags} bags ({distinct} distinct arrays, "
          f"cycled) of {args.tiles} x {args.features}; 1 untimed warm-up call on {args.warmup} bags per row; "
          f"fit_mil adds the set-up (tile_statistics over every tile) to the epoch\n")  # fmt: skip
    heads = ["head", "max_tiles_train", "epoch (s)", "ms per bag", "bags/s", "fit_mil call (s)", "other load (cores)"]
    print_table(heads, [[r["head"], r["max_tiles_train"], f"{r['epoch_s']:.1f}", f"{r['ms_per_bag']:.1f}",
                         f"{r['bags_per_s']:.1f}", f"{r['fit_mil_s']:.1f}", f"{r['other_cores']:.2f}"]
                        for r in rows])  # fmt: skip


if __name__ == "__main__":
    main()
