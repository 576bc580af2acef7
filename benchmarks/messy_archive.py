"""A small messy DICOM "archive" for the scoring walkthrough: real images and the damage real folders hold.

Writes, under ``OUT``:

- ``--images`` real single-frame CT, MR, CR, US and OT images of pydicom and pydicom-data (raw, JPEG,
  JPEG-LS, JPEG 2000, RLE, deflate, big endian), taken in turn from each modality, copied byte for byte to
  ``<Modality>/<NNN>.dcm``; the first two of them go into a directory named ``series.dcm``;
- ``CT/absurd.dcm``: CT_small.dcm with a header edited to declare 65535 x 65535 x 3 pixels;
- ``CT/cut.dcm``: a JPEG 2000 image cut at 60% of its bytes;
- ``MR/empty.dcm`` (0 bytes) and ``MR/scan.dcm`` (a PNG image renamed);
- ``plan.dcm`` (an RT plan) and ``report.dcm`` (an SR document): DICOM without pixel data;
- ``notes.txt``; ``link.dcm``, a link to a file that does not exist, and ``loop.dcm``, a link to itself.

Nothing is downloaded; nothing is committed. Score it with ``medvision score OUT --model RUN``.

    python benchmarks/messy_archive.py --out archive [--images 48]
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
from dicom_corpus import MODALITIES, shipped_files, source_files
from pydicom.uid import JPEG2000TransferSyntaxes


def pick(images: int) -> list[tuple[Path, str]]:
    """``images`` decodable source images, one modality after another so that each is represented."""
    by_modality: dict[str, list[Path]] = {m: [] for m in MODALITIES}
    for path, modality in source_files():
        by_modality[modality].append(path)
    chosen: list[tuple[Path, str]] = []
    while len(chosen) < images and any(by_modality.values()):
        for modality in MODALITIES:
            if by_modality[modality] and len(chosen) < images:
                chosen.append((by_modality[modality].pop(0), modality))
    return chosen


def make_archive(out: Path, images: int) -> int:
    """Writes the archive; returns the number of real images in it."""
    chosen = pick(images)
    shipped = {p.name: p for p in shipped_files()}
    needed = {"CT_small.dcm", "rtplan.dcm", "test-SR.dcm"} - set(shipped)
    if needed:
        raise FileNotFoundError(f"pydicom's test files lack {sorted(needed)}; the archive is built from them")
    for i, (path, modality) in enumerate(chosen):
        folder = out / "series.dcm" if i < 2 else out / modality
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / f"{sum(1 for _ in folder.iterdir()):03d}.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out / "CT").mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(shipped["CT_small.dcm"])
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 65535, 65535, 3
        ds.save_as(out / "CT" / "absurd.dcm", enforce_file_format=False)
        j2k = [
            p
            for p, _ in chosen
            if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID in JPEG2000TransferSyntaxes
        ]
    if not j2k:
        raise ValueError(f"none of the {len(chosen)} images chosen is JPEG 2000; cut.dcm needs one (ask for more)")
    data = j2k[0].read_bytes()
    (out / "CT" / "cut.dcm").write_bytes(data[: int(len(data) * 0.6)])
    (out / "MR").mkdir(parents=True, exist_ok=True)
    (out / "MR" / "empty.dcm").write_bytes(b"")
    picture = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    (out / "MR" / "scan.dcm").write_bytes(cv2.imencode(".png", picture)[1].tobytes())
    shutil.copyfile(shipped["rtplan.dcm"], out / "plan.dcm")
    shutil.copyfile(shipped["test-SR.dcm"], out / "report.dcm")
    (out / "notes.txt").write_text("reading list for the tumour board; not an image\n")
    os.symlink("missing.dcm", out / "link.dcm")
    os.symlink("loop.dcm", out / "loop.dcm")
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("archive"))
    parser.add_argument("--images", type=int, default=48, help="real DICOM images in the archive")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    n = make_archive(args.out, args.images)
    print(f"{args.out}: {n} real DICOM images (2 in a directory named series.dcm), 9 damaged or non-image files")


if __name__ == "__main__":
    main()
