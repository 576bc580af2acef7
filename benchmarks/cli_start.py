"""How long a command takes to start: this checkout against an earlier commit, on the same slides, in the same run.

Two commands, each as a user types it, in a fresh process (``python -m medvision``):

- ``medvision --help``: what the parser costs (and a mistyped option: the same import);
- ``medvision features`` on ``--slides`` small slides (built from the real H&E tiles, 4096 x 3072 at 0.25 µm/px,
  ``tf_efficientnet_lite0`` with its ImageNet weights from ``../shared``), into a fresh folder: the whole command,
  start to exit, and the seconds its summary line reports (from the first slide to the last file);
- with ``--score RUN_DIR FOLDER``, ``medvision score FOLDER --model RUN_DIR`` the same way (e.g. the README's
  messy DICOM archive, ``benchmarks/messy_archive.py``, with the run of ``recipes/dicom_modality.yaml``).

The baseline is ``--baseline`` (a git ref), checked out into a temporary worktree and run with ``PYTHONPATH``
pointing at it, from its folder; this checkout runs the same way. The two alternate, ``--rounds`` times;
medians, and the ratio baseline / this checkout.

    python benchmarks/cli_start.py [--baseline bd864cb] [--slides 3] [--rounds 3] [--score RUN_DIR FOLDER]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_info, print_table, write_csv

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.wsi.synthetic import build_slide_set

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDVISION_SHARED", REPO.parent / "shared"))


def timed(code: Path, args: list[str], codes: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Wall seconds of ``python -m medvision ARGS`` run in ``code`` (``-m`` puts the working folder first on the
    path; ``PYTHONPATH`` for the processes it starts), and its output."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medvision", *args], cwd=code, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode not in codes:
        raise RuntimeError(f"medvision {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout + done.stderr


def summary_seconds(text: str) -> float:
    """The seconds of a command's summary line (``... N tile(s) in 1.5 s (...)``), NaN when it has none."""
    found = re.search(r"(?:tile|image)\(s\) in ([\d.]+) s", text)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="bd864cb", help="git ref to compare with (default: %(default)s)")
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--score", nargs=2, type=Path, metavar=("RUN_DIR", "FOLDER"),
                    help="also time `medvision score FOLDER --model RUN_DIR` (exit 3 counts as done)")  # fmt: skip
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_suffix(".csv"))
    args = ap.parse_args()
    weights = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    root = Path(tempfile.mkdtemp(prefix="cli-start-"))
    base = root / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.baseline], check=True)
    try:
        build_slide_set(SHARED / "data" / "he_tiles", root / "slides", n_slides=args.slides, size=(4096, 3072),
                        mpp=0.25, formats=("aperio",), seed=0)  # fmt: skip
        features = ["features", str(root / "slides"), "--encoder", "timm:tf_efficientnet_lite0", "--checkpoint",
                    str(weights)]  # fmt: skip
        codes = {f"baseline ({args.baseline})": base, "this checkout": REPO}
        walls: dict[tuple[str, str], list[float]] = {}
        inside: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for name, code in codes.items():
                wall, _ = timed(code, ["--help"])
                walls.setdefault(("--help", name), []).append(wall)
                out = root / f"out-{r}-{name[:4]}"
                wall, text = timed(code, [*features, "--out", str(out)])
                walls.setdefault(("features", name), []).append(wall)
                inside.setdefault(("features", name), []).append(summary_seconds(text))
                shutil.rmtree(out)
                if args.score:
                    run, folder = (str(p.resolve()) for p in args.score)
                    wall, text = timed(code, ["score", folder, "--model", run, "--out", f"{out}.csv"], (0, 3))
                    walls.setdefault(("score", name), []).append(wall)
                    inside.setdefault(("score", name), []).append(summary_seconds(text))
                print(f"round {r}: {name}: done", flush=True)
        machine = f"{cpu_info()}; python {sys.version.split()[0]}"
        rows = []
        for command in ("--help", "features", *(["score"] if args.score else [])):
            old, new = (statistics.median(walls[command, n]) for n in codes)
            for name in codes:
                wall = statistics.median(walls[command, name])
                summary = round(statistics.median(inside[command, name]), 2) if command != "--help" else ""
                rows.append({"command": command, "code": name, "wall_s": round(wall, 2),
                             "range_s": f"{min(walls[command, name]):.2f}-{max(walls[command, name]):.2f}",
                             "summary_s": summary,
                             "baseline_over_this": round(old / new, 2)})  # fmt: skip
        print(f"machine: {machine}; {args.slides} slides, {args.rounds} rounds")
        print_table(["command", "code", "wall (s, median)", "range (s)", "summary line's seconds", "baseline / this"],
                    [list(r.values()) for r in rows])  # fmt: skip
        write_csv(args.csv, rows, machine)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
