"""A folder of real DICOM files for the DICOM recipe and the scoring benchmark.

Copies every single-frame CT, MR, CR, US and OT image that pydicom and pydicom-data ship (and that
pydicom can decode: raw, JPEG, JPEG-LS, JPEG 2000, RLE, deflate, big-endian) ``--copies`` times into
``OUT/<Modality>/``, each copy with its own SOPInstanceUID and a patient id, so the modality is the
class and the patient grouping is real. Nothing is downloaded; nothing is committed.

    python benchmarks/dicom_corpus.py --out dicom-corpus --copies 4
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from medvision.io.dicom import shipped_test_folders

MODALITIES = ("CT", "MR", "CR", "US", "OT")


def shipped_files() -> list[Path]:
    """Every file under pydicom's and (when installed) pydicom-data's test folders, sorted."""
    folders = shipped_test_folders().values()
    return sorted((p for folder in folders for p in folder.rglob("*") if p.is_file()), key=str)


def source_files(max_bytes: int = 4_000_000) -> list[tuple[Path, str]]:
    """(file, modality) for every decodable single-frame image of the chosen modalities."""
    out = []
    for path in shipped_files():
        if path.stat().st_size > max_bytes:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                ds.pixel_array  # noqa: B018
        except Exception:
            continue
        modality = str(ds.get("Modality", ""))
        if modality in MODALITIES and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            out.append((path, modality))
    return out


def make_corpus(out: Path, copies: int) -> int:
    """Writes the corpus; returns the number of files.

    All copies of one source image share a patient id, so a patient-grouped split never puts the
    same picture in train and test. Source files that pydicom cannot write back are left out.
    """
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, modality in source_files():
            ds = pydicom.dcmread(path)
            ds.PatientID = f"{modality}-{path.stem}"
            for k in range(copies):
                ds.SOPInstanceUID = generate_uid()
                target = out / modality / f"{path.stem}_{k:03d}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    ds.save_as(target, enforce_file_format=False)
                except (TypeError, ValueError, AttributeError):
                    target.unlink(missing_ok=True)
                    break
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dicom-corpus"))
    parser.add_argument("--copies", type=int, default=4)
    args = parser.parse_args()
    print(f"{make_corpus(args.out, args.copies)} files in {args.out}")


if __name__ == "__main__":
    main()
