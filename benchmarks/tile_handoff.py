"""How a batch of tiles gets from a reader process to the model: pickled through the pool's pipe, or left in RAM.

The readers of ``score`` and ``features`` run in a Pebble pool (crash isolation, :mod:`medvision.workers`). A result
that comes back through the pool's pipe goes in 64 KB steps, each a switch between the two processes, and is
unpickled in the parent, on the cores the encoder needs. With ``isolated_map(..., hand_off=True)`` (what the tile
stream uses) a worker writes each array result into a slot in RAM that the parent made (a memory file, or a file in
``/dev/shm`` where there are none), which the parent reads back and gives out again
(:class:`~medvision.handoff.Slots`, :class:`~medvision.handoff.HandOff`). This script runs ``isolated_map`` both
ways over ``--batches`` batches (one worker, a batch a task, reading ahead as the tile stream does), alternating,
``--rounds`` times: the wall time a batch (the whole call over the batches, the pool's start included) and the
parent's CPU time a batch (``time.process_time``: all the parent's threads), medians over the rounds. Both processes
reuse freed memory as the tasks and their readers do (``runtime.reuse_freed_memory``).

Batches: what ``features`` reads (uint8 (32, 224, 224, 3), 4.8 MB) and what ``score`` reads (the model's input,
float32 (32, 3, 224, 224), 19 MB). The worker's time to make the batch (``np.full``) is in both.

Then the file itself, two ways, alternating, in the same run (``--file-batches`` batches a round): a new file a
batch (the writer makes it, the parent reads it back and removes it: the hand-off as first written) against a few
slots written in place and used again once read back (what ``isolated_map`` does now), both through
:class:`~medvision.handoff.HandOff` with four batches in flight, one writer process: MB/s moved, and the
parent's CPU time a batch. A new file needs new pages from the kernel for every batch; a slot keeps its pages.

Last, the tile stream as a GPU sees it (``--consumer-ms``, default 7: ``tf_efficientnet_lite0``'s batch of 32 on
an H200, mostly kernel launches): a consumer that holds the GIL for that long a batch, as an eager model's
launches do, takes ``--consumer-batches`` 4.8 MB batches from ``isolated_map`` with ``--workers`` readers (each
list a run), three ways: through the pipe; through slots that are memory files (``memfd``, what the pool uses);
and through slots that are files in ``--shm-dir`` (default ``/dev/shm``; mount a small tmpfs, e.g. ``mount -t
tmpfs -o size=64m tmpfs /mnt/shm64``, to see a Docker container's 64 MB). Batches/s, the share of the consumer's
own rate (``1000 / consumer_ms``) that each way keeps, and how many batches came through the pipe.

    python benchmarks/tile_handoff.py [--batches 30] [--rounds 5] [--file-batches 200]
        [--consumer-ms 7] [--consumer-batches 200] [--workers 4 12] [--shm-dir /mnt/shm64] [--only consumer]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import busy, cpu_info, print_table, write_csv

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision import handoff
from medvision.handoff import HandOff, Slots, discard, handoff_path
from medvision.runtime import reuse_freed_memory
from medvision.workers import PoolStats, isolated_map, start_forkserver

IN_FLIGHT = 4  # as the tile stream reads ahead: two batches a worker

BATCHES = {"features: uint8 (32, 224, 224, 3)": ((32, 224, 224, 3), "uint8"),
           "score: float32 (32, 3, 224, 224)": ((32, 3, 224, 224), "float32")}  # fmt: skip


def make(batches: list[tuple[tuple[int, ...], str]]) -> list[np.ndarray]:
    """A reader's work: each batch, of the shape and dtype asked for."""
    return [np.full(shape, 7, dtype) for shape, dtype in batches]


def _writer(paths: Any, handed: Any, shape: tuple[int, ...], dtype: str, fresh: bool) -> None:
    """The reader's side: a batch into each path it is given, in a new file (``fresh``) or the slot as it is."""
    reuse_freed_memory()
    batch = np.full(shape, 7, dtype)
    while (path := paths.get()) is not None:
        if fresh:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        handed.put(HandOff.leave(batch, path))


def _name() -> str:
    """A new hand-off file's name, the file not made (the writer makes it, as the hand-off first did)."""
    path = handoff_path()
    os.unlink(path)
    return path


def file_way(shape: tuple[int, ...], dtype: str, n: int, fresh: bool) -> tuple[float, float]:
    """MB/s through the hand-off file over ``n`` batches, and the parent's CPU ms a batch."""
    ctx = multiprocessing.get_context("forkserver")
    paths, handed = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_writer, args=(paths, handed, shape, dtype, fresh))
    proc.start()
    slots = [_name() if fresh else handoff_path() for _ in range(IN_FLIGHT)]  # fresh: the writer makes each file
    c, t = time.process_time(), time.perf_counter()
    for slot in slots:
        paths.put(slot)
    for i in range(n):
        got = handed.get()
        assert isinstance(got, HandOff), "the hand-off file could not be written"
        array = got.take()
        assert array.shape == shape
        if fresh:
            discard(got.path)
        if i + IN_FLIGHT < n:
            paths.put(_name() if fresh else got.path)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    paths.put(None)
    proc.join()
    for path in Path(slots[0]).parent.glob(f"medvision-handoff-{os.getpid()}-*"):
        path.unlink()
    return n * int(np.prod(shape)) * np.dtype(dtype).itemsize / seconds / 1e6, 1000 * cpu / n


def consumer_way(way: str, n: int, workers_n: int, ms: float) -> tuple[float, int]:
    """Batches/s a GIL-holding consumer gets from ``isolated_map`` over ``n`` features batches, and how many came
    through the pipe: ``pipe``, ``memfd`` slots or ``file`` slots in ``handoff.HANDOFF_DIR``."""
    stats = PoolStats()
    shape, dtype = BATCHES["features: uint8 (32, 224, 224, 3)"]
    Slots.memory_files = way == "memfd"  # read when the pool makes its slots, at its first result
    try:
        stream = isolated_map(make, [(shape, dtype)] * (n + 2 * workers_n), workers=workers_n, timeout=60, chunk=1,
                              initializer=reuse_freed_memory, hand_off=way != "pipe", stats=stats)  # fmt: skip
        for _ in range(2 * workers_n):  # the pool started and the readers ahead: then the steady rate
            next(stream)
    finally:
        Slots.memory_files = True
    start, got = time.perf_counter(), 0
    for _, batch in stream:
        assert isinstance(batch, np.ndarray) and batch.shape == shape
        busy(ms / 1000)  # the GIL held, as by an eager model's kernel launches
        got += 1
    return got / (time.perf_counter() - start), stats.piped


def consumer_table(args: argparse.Namespace, machine: str) -> None:
    handoff.HANDOFF_DIR = args.shm_dir  # where handoff_path and the slots make their files
    rows = []
    for workers_n in args.workers:
        got: dict[str, list[tuple[float, int]]] = {"pipe": [], "memfd": [], "file": []}
        for r in range(args.rounds + 1):  # round 0 warms up: not counted
            for way in got:
                result = consumer_way(way, args.consumer_batches, workers_n, args.consumer_ms)
                if r:
                    got[way].append(result)
        row: dict[str, Any] = {"workers": workers_n, "consumer_ms": args.consumer_ms, "shm_dir": str(args.shm_dir),
                               "consumer_alone_batches_s": round(1000 / args.consumer_ms, 1)}  # fmt: skip
        for way, results in got.items():
            rate = statistics.median(b for b, _ in results)
            row[f"{way}_batches_s"] = round(rate, 1)
            row[f"{way}_share"] = round(rate * args.consumer_ms / 1000, 2)
            if way != "pipe":  # through their slot, or the pipe when the slot could not be written
                row[f"{way}_piped"] = max(p for _, p in results)
        rows.append(row)
        print(row, flush=True)
    print(f"consumer holding the GIL {args.consumer_ms} ms a batch, {args.consumer_batches} batches of 4.8 MB, "
          f"{args.rounds} rounds each way, alternating; file slots in {args.shm_dir}")  # fmt: skip
    heads = ["readers", "pipe (batches/s, share)", "memory-file slots", f"file slots in {args.shm_dir}",
             "piped with file slots (most in a round)"]  # fmt: skip
    print_table(heads, [[r["workers"], f"{r['pipe_batches_s']} ({r['pipe_share']:.2f})",
                         f"{r['memfd_batches_s']} ({r['memfd_share']:.2f})",
                         f"{r['file_batches_s']} ({r['file_share']:.2f})", r["file_piped"]] for r in rows])  # fmt: skip
    write_csv(args.csv.with_name(args.csv.stem + "_consumer.csv"), rows, machine)


def pipe_table(args: argparse.Namespace, machine: str) -> None:
    rows = []
    for what, (shape, dtype) in BATCHES.items():
        wall: dict[str, list[float]] = {"pipe": [], "hand-off": []}
        cpu: dict[str, list[float]] = {"pipe": [], "hand-off": []}
        for r in range(args.rounds + 1):  # round 0 warms the forkserver and the page cache: not counted
            for way in wall:
                c, t = time.process_time(), time.perf_counter()
                for _, batch in isolated_map(make, [(shape, dtype)] * args.batches, workers=1, timeout=60, chunk=1,
                                             initializer=reuse_freed_memory, hand_off=way == "hand-off"):  # fmt: skip
                    assert isinstance(batch, np.ndarray) and batch.shape == shape
                if r:
                    wall[way].append((time.perf_counter() - t) / args.batches)
                    cpu[way].append((time.process_time() - c) / args.batches)
        row = {"batch": what, "mb": round(int(np.prod(shape)) * np.dtype(dtype).itemsize / 1e6, 1)}
        for way in wall:
            row[f"{way}_ms"] = round(1000 * statistics.median(wall[way]), 1)
            row[f"{way}_parent_cpu_ms"] = round(1000 * statistics.median(cpu[way]), 1)
        row["wall_ratio"] = round(row["pipe_ms"] / row["hand-off_ms"], 2)
        row["cpu_ratio"] = round(row["pipe_parent_cpu_ms"] / max(row["hand-off_parent_cpu_ms"], 0.1), 2)
        rows.append(row)
        print(row, flush=True)
    print(f"machine: {machine}; {args.rounds} rounds of {args.batches} batches each way, alternating")
    heads = ["batch", "MB", "pipe (ms)", "hand-off (ms)", "ratio", "parent CPU, pipe (ms)", "parent CPU, hand-off (ms)",
             "ratio"]  # fmt: skip
    print_table(heads, [[r["batch"], r["mb"], r["pipe_ms"], r["hand-off_ms"], f"{r['wall_ratio']:.1f}x",
                         r["pipe_parent_cpu_ms"], r["hand-off_parent_cpu_ms"], f"{r['cpu_ratio']:.1f}x"]
                        for r in rows])  # fmt: skip
    write_csv(args.csv, rows, machine)


def file_table(args: argparse.Namespace, machine: str) -> None:
    files = []
    for what, (shape, dtype) in BATCHES.items():
        got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for r in range(args.rounds + 1):  # round 0 warms up: not counted
            for fresh in (True, False):
                result = file_way(shape, dtype, args.file_batches, fresh)
                if r:
                    got[fresh].append(result)
        row = {"batch": what, "batches": args.file_batches}
        for fresh, name in ((True, "new_file"), (False, "slot")):
            row[f"{name}_mb_s"] = round(statistics.median(m for m, _ in got[fresh]))
            row[f"{name}_mb_s_min"] = round(min(m for m, _ in got[fresh]))
            row[f"{name}_mb_s_max"] = round(max(m for m, _ in got[fresh]))
            row[f"{name}_parent_cpu_ms"] = round(statistics.median(c for _, c in got[fresh]), 2)
        row["ratio"] = round(row["slot_mb_s"] / row["new_file_mb_s"], 2)
        files.append(row)
        print(row, flush=True)
    print(f"the hand-off file: {args.rounds} rounds of {args.file_batches} batches each way, alternating")
    heads = ["batch", "new file a batch (MB/s)", "slot used again (MB/s)", "ratio", "parent CPU, new file (ms)",
             "parent CPU, slot (ms)"]  # fmt: skip
    print_table(heads, [[r["batch"], f"{r['new_file_mb_s']} ({r['new_file_mb_s_min']}-{r['new_file_mb_s_max']})",
                         f"{r['slot_mb_s']} ({r['slot_mb_s_min']}-{r['slot_mb_s_max']})", f"{r['ratio']:.1f}x",
                         r["new_file_parent_cpu_ms"], r["slot_parent_cpu_ms"]] for r in files])  # fmt: skip
    write_csv(args.csv.with_name(args.csv.stem + "_file.csv"), files, machine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--file-batches", type=int, default=200)
    ap.add_argument("--consumer-ms", type=float, default=7.0)
    ap.add_argument("--consumer-batches", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--shm-dir", type=Path, default=handoff.HANDOFF_DIR)
    ap.add_argument("--only", choices=["pipe", "file", "consumer"], help="one part only")
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    args = ap.parse_args()
    reuse_freed_memory()  # as in every task, and in the tile readers (the pool's initializer)
    start_forkserver()
    machine = cpu_info()
    if args.only in (None, "pipe"):
        pipe_table(args, machine)
    if args.only in (None, "file"):
        file_table(args, machine)
    if args.only in (None, "consumer"):
        consumer_table(args, machine)


if __name__ == "__main__":
    main()
