"""What tile readers beside it cost a model that computes on the CPU's cores, by when they read.

On a CPU the tile readers of ``features`` and slide ``score`` run on the cores the encoder's threads use. This
script measures what that costs with nothing but the encoder and stand-in readers: processes that keep one core
busy for ``--busy-ms`` a batch (one tile batch read: 32 tiles x 1.4 ms, ``feature_throughput.py``'s reader
alone). The encoder (``timm:tf_efficientnet_lite0``, ImageNet weights from ``../shared`` when there, on the
process's torch threads) embeds the same random uint8 batches of 32 tiles of 224 px through
``PatchEncoder.embed``, one batch at a time, in each precision, five ways, alternating, median of ``--rounds``:

- **alone**: nothing else runs;
- **beside, any time**: one stand-in per torch thread; one of them reads each batch, at most two batches ahead
  of the encoder, whenever it has room (what the readers did before they took turns); the encoder takes a batch
  once it has been read;
- **beside, nice 19** and **beside, SCHED_IDLE**: the same, with the stand-ins at the lowest priorities Linux
  gives;
- **in turns**: before each batch the encoder lets every stand-in read its share of the batch at once and waits
  for them: what ``isolated_map(turns=True)`` makes the readers do;
- **idle wait**: no stand-in; before each batch the encoder waits as long as the stand-ins in turns take
  (``busy_ms / threads``) with nothing running: what the wait between batches costs by itself.

Besides the rate, each way's *forward time* is the time spent inside ``embed`` over that alone (the readers' cost
to the encoder's own passes, not counting the waits between them).

The *bound* is the share of its rate the encoder keeps if the reading cost it exactly its CPU time on all the
cores: ``T / (T + busy_ms / threads)`` for a batch of ``T`` ms alone. A figure above it means the encoder alone
leaves some of its cores idle (single-threaded steps between its parallel regions), which a reader can use.
The stand-ins are spawned, not forked: after a fork the encoder's whole heap is shared copy-on-write, and its next
forward passes fault every page in again (the first one 2.6x slower here), a cost no real reader brings (the
pools start from a forkserver).

    python benchmarks/cpu_corunner.py [--busy-ms 46] [--batches 20] [--rounds 3] [--amp none,bf16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import busy, cpu_info, print_table, write_csv

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.models.encoders import load_encoder
from medvision.runtime import resolve_amp, reuse_freed_memory

SHARED = Path(os.environ.get("MEDVISION_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WAYS = ["alone", "beside, any time", "beside, nice 19", "beside, SCHED_IDLE", "in turns", "idle wait"]


def stand_in(way: str, busy_s: float, tokens: Any, done: Any) -> None:
    """A reader: for each token (a batch the encoder asks for), keeps one core busy for ``busy_s``."""
    if way == "beside, nice 19":
        os.nice(19)
    elif way == "beside, SCHED_IDLE":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    done.release()  # started
    while True:
        tokens.acquire()
        busy(busy_s)
        done.release()


def embed_beside(encoder: Any, batches: list[np.ndarray], amp: str, busy_s: float, way: str) -> tuple[float, float]:
    """Seconds to embed ``batches`` one by one with stand-in readers working as ``way`` says (the module
    docstring; ``alone`` and ``idle wait``: none), and the seconds of it inside ``embed``."""
    ctx = mp.get_context("spawn")  # not fork: see the module docstring
    tokens, done = ctx.Semaphore(0), ctx.Semaphore(0)
    readers = 0 if way in ("alone", "idle wait") else torch.get_num_threads()
    wait = busy_s / torch.get_num_threads() if way == "idle wait" else 0.0
    turns = way == "in turns"
    ahead = readers > 0 and not turns  # a reader reads whenever it has room, up to two batches ahead
    procs = [ctx.Process(target=stand_in, args=(way, busy_s / readers if turns else busy_s, tokens, done),
                         daemon=True) for _ in range(readers)]  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        done.acquire()
    for _ in range(2 if ahead else 0):
        tokens.release()
    start, forward = time.perf_counter(), 0.0
    for batch in batches:
        if turns:  # every reader reads its share of the batch, and the encoder waits for them all
            for _ in procs:
                tokens.release()
            for _ in procs:
                done.acquire()
        elif ahead:
            done.acquire()  # the batch has been read
        elif wait:
            time.sleep(wait)
        t = time.perf_counter()
        encoder.embed([batch], torch.device("cpu"), amp)
        forward += time.perf_counter() - t
        if ahead:
            tokens.release()  # room for one more ahead
    seconds = time.perf_counter() - start
    for p in procs:
        p.terminate()
        p.join()
    return seconds, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy-ms", type=float, default=46.0, help="one core's reading a batch (default: %(default)s)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--amp", default="none,auto", help="precisions, comma separated")
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    args = ap.parse_args()
    reuse_freed_memory()
    weights = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    encoder, _ = load_encoder("timm:tf_efficientnet_lite0", weights if weights.is_file() else None)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8) for _ in range(args.batches)]
    threads, busy_s, n = torch.get_num_threads(), args.busy_ms / 1000.0, 32 * args.batches
    machine = f"{cpu_info()}; torch {torch.__version__}; {threads} torch threads"
    print(f"machine: {machine}")
    rows = []
    for amp_name in args.amp.split(","):
        amp = resolve_amp(amp_name, torch.device("cpu"))
        encoder.embed(batches[:2], torch.device("cpu"), amp)  # warm-up
        rates: dict[str, list[float]] = {w: [] for w in WAYS}
        forwards: dict[str, list[float]] = {w: [] for w in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                seconds, forward = embed_beside(encoder, batches, amp, busy_s, way)
                rates[way].append(n / seconds)
                forwards[way].append(forward)
        alone = statistics.median(rates["alone"])
        batch_ms = 1000.0 * 32 / alone
        for way in WAYS:
            rate = statistics.median(rates[way])
            rows.append({"precision": amp, "way": way, "tiles_s": round(rate, 2), "share": round(rate / alone, 3),
                         "bound": round(batch_ms / (batch_ms + args.busy_ms / threads), 3),
                         "forward_x": round(statistics.median(forwards[way]) / statistics.median(forwards["alone"]), 3),
                         "busy_ms": args.busy_ms, "batch_ms": round(batch_ms, 1), "threads": threads})  # fmt: skip
            print(rows[-1], flush=True)
    print_table(
        ["precision", "stand-in reader", "encoder (tiles/s)", "share of alone", "bound", "forward time (x alone)"],
        [
            [r["precision"], r["way"], r["tiles_s"], f"{r['share']:.2f}", f"{r['bound']:.2f}", f"{r['forward_x']:.3f}"]
            for r in rows
        ],
    )
    write_csv(args.csv, rows, machine)


if __name__ == "__main__":
    main()
