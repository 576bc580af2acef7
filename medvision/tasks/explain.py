"""``medvision explain RUN``: Grad-CAM overlays of given images, or of a run's most confident errors.

The Grad-CAM maths (target layer, weights, overlays, choosing the errors) is shared with the report's
error panel and lives in :mod:`medvision.gradcam`; this task reads the images as the run was trained
(DICOM windows included) and writes the PNGs, a panel and a CSV. errors.csv names images by their ids as
predictions.csv does (paths or npz indices, which name a patient where file or folder names do) and explain.csv
by the paths given, so like predictions.csv they are local files; the error overlays are named by rank and kind,
the given images' overlays by their file stems. Nothing is read from DICOM headers into any of them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import cv2
import torch

from medvision.data.dataset import Transfer, prepare
from medvision.data.dicom_source import dicom_spec
from medvision.data.transforms import build_transforms
from medvision.evaluation import Decision
from medvision.gradcam import (
    ExplainError,
    cams_and_logits,
    check_method,
    coarse_note,
    display_image,
    overlay,
    target_layer_name,
)
from medvision.inference import load_run, split_outputs
from medvision.io.dicom import NotADicomImage, read_dicom
from medvision.io.image import IMAGE_SUFFIXES, ImageReadError, read_image_raw
from medvision.models.deploy import CalibratedClassifier
from medvision.plots import plot_image_grid
from medvision.recipe import Recipe
from medvision.results import explain_panel
from medvision.runs import RunError
from medvision.runtime import (
    resolve_device,
    resolve_workers,
)
from medvision.tasks.evaluate import open_split
from medvision.training.build import split_dataset

log = logging.getLogger("medvision")
CSV_COLUMNS = ["path", "predicted_class", "probability", "target_class", "method", "overlay", "error"]


def explain_errors(
    run_dir: Path, out: Path | None = None, split: str = "test", method: str | None = None, n: int | None = None
) -> list[Path]:
    """Grad-CAM overlays of a run's most confident errors on one split, one PNG each plus a panel.

    Writes ``<out>/errors.csv`` (id, label, call, confidence, kind, file). ``id`` is the image's id as
    in predictions.csv (its path, or npz split and index), which can name a patient where file or folder
    names do: keep the CSV as local as predictions.csv. The overlays are named by rank, kind and method
    only (``00_false_positive_gradcam.png``), never by image. Returns the PNG paths, the panel last;
    none (and a header-only CSV) when the model makes no error on the split.

    ``method`` and ``n`` (errors of each kind, at least 1) default to the recipe's
    ``evaluation.explain_method`` and ``evaluation.explain``.

    Raises:
        ExplainError: Grad-CAM cannot be computed for this model.
    """
    if n is not None and n < 1:
        raise ExplainError(f"n is {n}; expected at least 1 error of each kind to explain")
    if method is not None:
        check_method(method)
    device, recipe, meta, bundle, table, split = open_split(run_dir, None, None, split)
    method = method or recipe.evaluation.explain_method
    cfg = recipe.evaluation.model_copy(
        update={"explain": n if n is not None else recipe.evaluation.explain or 4, "explain_method": method}
    )
    workers = resolve_workers(recipe.data.num_workers, device)
    got = split_outputs(bundle, recipe, table, split, device, workers)
    assert got is not None  # one process: always the whole split
    outputs, ids, _ = got
    decision = Decision.from_json(meta.get("decision"))
    ds = split_dataset(recipe, table, bundle, split, train=False)
    classes = meta["classes"]
    panel = explain_panel(bundle, ds, outputs, decision, classes, cfg, device)
    out = out or run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    calls = outputs.probs(decision.temperature).argmax(axis=1)
    with (out / "errors.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "call", "confidence", "kind", "file"])
        for k, ((i, kind, conf), picture, _) in enumerate(panel):
            file = out / f"{k:02d}_{kind.replace(' ', '_')}_{cfg.explain_method}.png"
            if not cv2.imwrite(str(file), picture[:, :, ::-1]):
                raise RunError(f"{file}: OpenCV could not write the overlay PNG")
            written.append(file)
            call = int(calls[i])
            writer.writerow([ids[i], classes[int(outputs.labels[i])], classes[call], f"{conf:.4f}", kind, file.name])
    if panel:
        written.append(plot_image_grid(out / f"errors_{cfg.explain_method}.png", [p for _, p, _ in panel],
                                       [t for _, _, t in panel]))  # fmt: skip
    return written


def load_input(
    path: Path, recipe: Recipe, channels: int, transform: Any, transfer: Transfer = "float32"
) -> torch.Tensor:
    """One file through the run's own preprocessing: the (C, H, W) tensor the model sees (before normalisation
    where ``transform`` leaves it out; in the run's ``transfer`` dtype, rounded as its loader rounds).

    Files with a ``.dcm``/``.dicom`` suffix, or with no image suffix (DICOM is often stored without
    one), are read as DICOM with the recipe's windows; others with :func:`read_image_raw`.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raw = read_image_raw(path)
    else:
        try:
            pixels, _ = read_dicom(path, dicom_spec(recipe.data.dicom))
        except NotADicomImage as err:
            raise ImageReadError(f"{err}; expected a DICOM image or one of {IMAGE_SUFFIXES}") from None
        raw = pixels[0]
    return prepare(raw, recipe.data.intensity, channels, transform, transfer)


def _unique_name(stem: str, method: str, used: set[str]) -> str:
    name, k = f"{stem}_{method}.png", 2
    while name in used:  # two inputs with one stem (a/x.png, b/x.png) must not overwrite each other
        name, k = f"{stem}_{k}_{method}.png", k + 1
    used.add(name)
    return name


def explain_images(
    run_dir: Path, paths: list[Path], out: Path, method: str | None = None, target_class: str | None = None
) -> list[Path]:
    """Writes a heatmap overlay ``<out>/<stem>_<method>.png`` per image, plus ``<out>/explain.csv``.

    ``method`` defaults to the recipe's ``evaluation.explain_method``, as for the error panel. An
    overlay's name carries its input's file stem and ``explain.csv`` its path, so where file names
    name patients these outputs do too, as the inputs themselves do.

    Each image goes through the run's own preprocessing; the heatmap (for ``target_class``, else the
    predicted class) is drawn over that preprocessed input, so it lines up with what the model saw.
    An unreadable file does not stop the others: it is skipped with a logged warning and gets a row
    with its error in ``explain.csv``; only the overlays actually written are returned. The CSV holds
    the path, prediction, its probability (calibrated with the run's temperature and averaged over its test-time
    views, as in the report and ``score``), target, method and overlay name; nothing from DICOM headers.

    Examples:
        >>> explain_images(Path("runs/chest"), [Path("cxr1.dcm")], Path("explain"), method="gradcam++")
    """

    if method is not None:
        check_method(method)  # before loading the model: a typo fails at once
    recipe, meta, bundle = load_run(run_dir, resolve_device("auto"))
    method = method or recipe.evaluation.explain_method
    checked = check_method(method)
    classes: list[str] = meta["classes"]
    temperature = float((meta.get("decision") or {}).get("temperature") or 1.0)
    # the function score runs: normalise, each test-time view's softmax of logits / T, averaged over the views
    param = next(bundle.model.parameters())
    calibrated = CalibratedClassifier(bundle.model, bundle.mean, bundle.std, temperature,
                                      tuple(recipe.evaluation.tta)).to(param.device).eval()  # buffers too  # fmt: skip
    if target_class is not None and target_class not in classes:
        raise ExplainError(f"target class {target_class!r} is not one of the run's classes {classes}")
    # the evaluation loader's path: resize, round to the run's transfer dtype (uint8 for 8-bit images), normalise;
    # normalising the unrounded resize instead moved a probability by 5e-5
    transform = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std, normalize=False)
    transfer = meta.get("transfer", "float32")
    log.info("explaining %d image(s) with %s on layer %s", len(paths), method, target_layer_name(bundle.model))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    noted = False
    with (out / "explain.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for path in paths:
            try:
                raw = load_input(Path(path), recipe, bundle.in_chans, transform, transfer)[None].to(param.device)
            except (ImageReadError, OSError, ValueError) as err:
                log.warning("skipping %s: %s", path, err)
                writer.writerow([str(path), "", "", target_class or "", method, "", str(err)])
                continue
            with torch.no_grad():
                probs = calibrated(raw)[0].float().cpu().numpy()
            x = calibrated.normalise(raw)[0]
            pred = int(probs.argmax())
            target = torch.tensor([pred if target_class is None else classes.index(target_class)])
            heat, _, grid = cams_and_logits(bundle.model, x[None], target, checked)
            note = coarse_note(grid, (int(x.shape[-2]), int(x.shape[-1])))
            if note and not noted:  # one line for the batch: every image has the run's size
                log.warning("heatmaps from a %s; read them as rough regions", note)
                noted = True
            picture = overlay(display_image(x, bundle.mean, bundle.std), heat[0])
            file = out / _unique_name(Path(path).stem, method, used)
            if not cv2.imwrite(str(file), picture[:, :, ::-1]):
                raise OSError(f"{file}: OpenCV could not write the overlay PNG")
            written.append(file)
            writer.writerow([str(path), classes[pred], f"{probs[pred]:.6f}", target_class or classes[pred], method,
                             file.name, ""])  # fmt: skip
    return written
