"""How a batch of tiles gets from a reader process to the model: pickled through the pool's pipe, or left in RAM.

The readers of ``score`` and ``features`` run in a Pebble pool (crash isolation, :mod:`medvision.workers`). A result
that comes back through the pool's pipe goes in 64 KB steps, each a switch between the two processes, and is
unpickled in the parent, on the cores the encoder needs. :class:`~medvision.workers.HandOff` writes the batch to a
file in ``/dev/shm`` that the parent names, reads back and removes. This script times one batch coming back
both ways, from the same pool, alternating: the wall time from scheduling to having the array, and the parent's
CPU time for it (``time.process_time``: all the parent's threads), median over ``--batches``. Both processes
reuse freed memory as the tasks and their readers do (``runtime.reuse_freed_memory``).

Batches: what ``features`` reads (uint8 (32, 224, 224, 3), 4.8 MB) and what ``score`` reads (the model's input,
float32 (32, 3, 224, 224), 19 MB). The worker's time to make the batch (``np.full``) is in both.

    python benchmarks/tile_handoff.py [--batches 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from machine import cpu_info, print_table, write_csv

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.runtime import reuse_freed_memory
from medvision.workers import HandOff, _context, handoff_path, start_forkserver

BATCHES = {"features: uint8 (32, 224, 224, 3)": ((32, 224, 224, 3), "uint8"),
           "score: float32 (32, 3, 224, 224)": ((32, 3, 224, 224), "float32")}  # fmt: skip


def make(shape: tuple[int, ...], dtype: str, path: str) -> HandOff | np.ndarray:
    """A reader's result: a batch, through a hand-off file when ``path`` is given, else as itself."""
    batch = np.full(shape, 7, dtype)
    return HandOff.leave(batch, path) if path else batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    args = ap.parse_args()
    from pebble import ProcessPool

    reuse_freed_memory()  # as in every task, and in the tile readers (the pool's initializer)
    start_forkserver()
    pool = ProcessPool(max_workers=1, initializer=reuse_freed_memory, context=_context())
    machine = cpu_info()
    rows = []
    try:
        for what, (shape, dtype) in BATCHES.items():
            pool.schedule(make, (shape, dtype, "")).result()  # the worker started and warm
            wall: dict[str, list[float]] = {"pipe": [], "hand-off": []}
            cpu: dict[str, list[float]] = {"pipe": [], "hand-off": []}
            for _ in range(args.rounds):
                for way in wall:
                    for _ in range(args.batches):
                        c, t = time.process_time(), time.perf_counter()
                        path = handoff_path() if way == "hand-off" else ""
                        value = pool.schedule(make, (shape, dtype, path)).result()
                        batch = value.take() if isinstance(value, HandOff) else value
                        wall[way].append(time.perf_counter() - t)
                        cpu[way].append(time.process_time() - c)
                        assert batch.shape == shape and batch.dtype == np.dtype(dtype)
            row = {"batch": what, "mb": round(int(np.prod(shape)) * np.dtype(dtype).itemsize / 1e6, 1)}
            for way in wall:
                row[f"{way}_ms"] = round(1000 * statistics.median(wall[way]), 1)
                row[f"{way}_parent_cpu_ms"] = round(1000 * statistics.median(cpu[way]), 1)
            row["wall_ratio"] = round(row["pipe_ms"] / row["hand-off_ms"], 2)
            row["cpu_ratio"] = round(row["pipe_parent_cpu_ms"] / max(row["hand-off_parent_cpu_ms"], 0.1), 2)
            rows.append(row)
            print(row, flush=True)
    finally:
        pool.close()
        pool.join()
    print(f"machine: {machine}; {args.rounds} x {args.batches} batches each way, alternating")
    heads = ["batch", "MB", "pipe (ms)", "hand-off (ms)", "ratio", "parent CPU, pipe (ms)", "parent CPU, hand-off (ms)",
             "ratio"]  # fmt: skip
    print_table(heads, [[r["batch"], r["mb"], r["pipe_ms"], r["hand-off_ms"], f"{r['wall_ratio']:.1f}x",
                         r["pipe_parent_cpu_ms"], r["hand-off_parent_cpu_ms"], f"{r['cpu_ratio']:.1f}x"]
                        for r in rows])  # fmt: skip
    write_csv(args.csv, rows, machine)


if __name__ == "__main__":
    main()
