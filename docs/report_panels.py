"""Stitches a run report's ROC, reliability and Grad-CAM panels into one PNG for the README.

Usage: python docs/report_panels.py RUN_DIR docs/breastmnist_report.png

The panels are the report's own PNGs (``RUN_DIR/plots``), unchanged apart from scaling: the ROC
curve and the reliability diagrams side by side, the Grad-CAM panel of the most confident errors
below them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image


def stitch(run_dir: Path, out: Path, width: int = 1400) -> Path:
    plots = run_dir / "plots"
    roc, rel, cam = (Image.open(plots / f"{n}.png").convert("RGB") for n in ("roc", "reliability", "gradcam_errors"))
    height = max(roc.height, rel.height)
    top = [im.resize((round(im.width * height / im.height), height), Image.LANCZOS) for im in (roc, rel)]
    top_w = sum(im.width for im in top)
    cam = cam.resize((round(cam.width * top_w / cam.width * 0.8), round(cam.height * top_w / cam.width * 0.8)),
                     Image.LANCZOS)  # fmt: skip
    canvas = Image.new("RGB", (top_w, height + cam.height), "white")
    x = 0
    for im in top:
        canvas.paste(im, (x, 0))
        x += im.width
    canvas.paste(cam, ((top_w - cam.width) // 2, height))
    if canvas.width > width:
        canvas = canvas.resize((width, round(canvas.height * width / canvas.width)), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(stitch(Path(sys.argv[1]), Path(sys.argv[2])))
