"""What every benchmark records with its figures: the machine it ran on, and its rows as a CSV; and a stand-in
for work that keeps one core busy.

Scripts here run as ``python benchmarks/<name>.py``, so they import this module as ``machine``.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_info() -> str:
    """The CPU's model name, core count and whether it has AVX512-BF16 (native bf16), from ``/proc/cpuinfo``."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}"


def write_csv(path: Path, rows: list[dict[str, Any]], machine: str) -> None:
    """``rows`` as a CSV at ``path``, each with today's date and ``machine``; says where it wrote."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "date", "machine"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "date": datetime.date.today().isoformat(), "machine": machine})
    print(f"wrote {path}")


def print_table(headers: list[str], cells: list[list[Any]]) -> None:
    """A Markdown table, as ``benchmarks/RESULTS.md`` holds them (a blank line before it)."""
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in cells:
        print("| " + " | ".join(str(c) for c in row) + " |")


def busy(seconds: float) -> None:
    """Pure Python for ``seconds``: one core busy, and the GIL held the whole time (as by an eager model's kernel
    launches, or a tile reader's decoding in a process of its own)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
