"""CPU throughput with glibc's default malloc against ``runtime.reuse_freed_memory`` (same model, same batches).

Each case runs in a fresh process (the malloc setting is per process and is not undone), alternating the two
settings for ``--rounds`` rounds; a process warms up on two batches, then times ``--steps`` batches:

- ``embed``: ``tf_efficientnet_lite0`` forward in inference mode, batches of 32 at 224 px, channels-last (what
  ``medvision features`` and ``score`` do per batch), float32 and bf16 autocast;
- ``train``: forward, cross-entropy, backward and an AdamW step of ``tf_efficientnet_lite0`` (random weights,
  2 classes) at 64 px (batch 128) and 224 px (batch 32), float32.

Columns: images/s, the share of the process's CPU time spent in the kernel (page faults, mostly), minor page
faults a batch, and peak RSS. The ratio is reuse/default in images/s.

    python benchmarks/cpu_allocator.py [--rounds 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_info, print_table, write_csv

CASES = [("embed", 224, 32, "fp32"), ("embed", 224, 32, "bf16"), ("train", 64, 128, "fp32"), ("train", 224, 32, "fp32")]


def one(kind: str, size: int, batch: int, precision: str, reuse: bool, steps: int) -> dict[str, float]:
    """Runs in the child process: one case with one malloc setting."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import timm
    import torch

    from medvision.runtime import reuse_freed_memory

    if reuse:
        assert reuse_freed_memory()
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=2).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    amp = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    if kind == "embed":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), amp:
                model.forward_features(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step() -> None:
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(2):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"images_s": steps * batch / seconds, "kernel_share": system / max(user + system, 1e-9),
            "faults_per_batch": (r1.ru_minflt - r0.ru_minflt) / steps, "peak_rss_mb": r1.ru_maxrss / 1024}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, size, batch, precision, reuse = json.loads(args.child)
        print(json.dumps(one(kind, size, batch, precision, reuse, args.steps)))
        return
    import torch

    print(f"machine: {cpu_info()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for kind, size, batch, precision in CASES:
        got: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for reuse in (False, True):
                child = json.dumps([kind, size, batch, precision, reuse])
                cmd = [sys.executable, __file__, "--child", child, "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                got[reuse].append(json.loads(out.strip().splitlines()[-1]))
        med = {r: {k: statistics.median(m[k] for m in got[r]) for k in got[r][0]} for r in got}
        row = {"case": kind, "px": size, "batch": batch, "precision": precision}
        for r, name in ((False, "default"), (True, "reuse")):
            row.update({f"{name}_{k}": round(v, 3) for k, v in med[r].items()})
        row["ratio"] = round(med[True]["images_s"] / med[False]["images_s"], 2)
        rows.append(row)
        print(row, flush=True)
    heads = ["case", "px", "batch", "precision", "default malloc (img/s)", "kernel share", "reuse (img/s)",
             "kernel share", "ratio", "peak RSS default / reuse (MB)"]  # fmt: skip
    print_table(heads, [[r["case"], r["px"], r["batch"], r["precision"], f"{r['default_images_s']:.1f}",
                         f"{r['default_kernel_share']:.0%}", f"{r['reuse_images_s']:.1f}",
                         f"{r['reuse_kernel_share']:.0%}", f"{r['ratio']:.2f}x",
                         f"{r['default_peak_rss_mb']:.0f} / {r['reuse_peak_rss_mb']:.0f}"] for r in rows])  # fmt: skip
    write_csv(args.csv, rows, f"{cpu_info()}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
