"""Freeze phases under DDP: rebuild the wrapper per phase, or one wrapper with ``find_unused_parameters``.

Two gloo ranks on this machine, timm's ``resnet18`` at 64 px, 16 images per rank, the "head"
phase (backbone frozen) and the "all" phase. (a) is what medvision does: a new
``DistributedDataParallel`` per phase around the parameters that phase trains; its cost is the
construction (a broadcast of the weights). (b) builds one wrapper over all parameters with
``find_unused_parameters=True`` and freezes inside it; its cost is a graph walk every step. Prints
a table and writes a CSV.

    python benchmarks/ddp_phase_wrap.py [--steps 20]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medvision.models.freeze import apply_trainable, select_trainable


def _steps(model: nn.Module, params: list[nn.Parameter], steps: int) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 2, (16,))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[2:]  # two warm-up steps


def _worker(rank: int, port: int, steps: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    rows = []
    for phase in ("head", "all"):
        model = timm.create_model("resnet18", num_classes=2)
        apply_trainable(model, select_trainable(model, [phase]))
        params = [p for p in model.parameters() if p.requires_grad]
        start = time.perf_counter()
        rebuilt = nn.parallel.DistributedDataParallel(model)
        build = time.perf_counter() - start
        step_a = statistics.median(_steps(rebuilt, params, steps))
        model = timm.create_model("resnet18", num_classes=2)
        once = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # built with all trainable
        apply_trainable(model, select_trainable(model, [phase]))
        params = [p for p in model.parameters() if p.requires_grad]
        step_b = statistics.median(_steps(once, params, steps))
        rows.append({"phase": phase, "rebuild_construct_ms": build * 1e3, "rebuild_step_ms": step_a * 1e3,
                     "find_unused_step_ms": step_b * 1e3, "find_unused_vs_rebuild": step_b / step_a})  # fmt: skip
    if rank == 0:
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ddp_phase_wrap.csv"))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp()) / "rows.csv"
    mp.start_processes(_worker, args=(port, args.steps, str(tmp)), nprocs=2, start_method="spawn")
    rows = list(csv.DictReader(tmp.open()))
    args.out.write_text(tmp.read_text())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; 2 gloo ranks, "
          f"1 thread each, resnet18 64 px, 16 img/rank, median of {args.steps} steps\n")  # fmt: skip
    print("| phase | rebuild: construct ms | rebuild: step ms | find_unused: step ms | find_unused / rebuild |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['phase']} | {float(r['rebuild_construct_ms']):.1f} | {float(r['rebuild_step_ms']):.1f} | "
            f"{float(r['find_unused_step_ms']):.1f} | {float(r['find_unused_vs_rebuild']):.2f}x |"
        )
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()
