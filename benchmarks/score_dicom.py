"""Scoring speed on real DICOM: a plain loop, ``medvision score`` in PyTorch, and in ONNX Runtime.

All run in this process, on the same files (pydicom's and pydicom-data's images, copied to a few
thousand files by ``dicom_corpus.py``), with the same model and the same preprocessing. The plain
loop is ``pydicom.dcmread -> pixel_array -> window -> model`` for one image at a time; medvision
decodes in crash-isolated worker processes and runs batched inference, with the run's model in
PyTorch (``--engine torch``) or its ONNX export (``medvision export --format onnx``, made here, with
its parity check) in ONNX Runtime (``--engine onnxruntime``). A second table times the two engines
alone, on the same preprocessed batches of real images, so that the model's share is visible apart
from decoding. Prints the tables, writes a CSV, and checks that the probabilities agree.

    python benchmarks/score_dicom.py [--copies 20] [--model RUN_DIR] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from dicom_corpus import make_corpus

from medvision.data.dataset import prepare
from medvision.data.dicom_source import dicom_spec, walk_files
from medvision.data.transforms import build_transforms
from medvision.inference import load_run
from medvision.io.dicom import DicomReadError, NotADicomImage, read_dicom
from medvision.recipe import load_recipe
from medvision.tasks.export.onnx import export_onnx
from medvision.tasks.score import ScoreSummary, load_scorer, score_folder
from medvision.tasks.train import train

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MEDVISION_SHARED", str(ROOT.parent / "shared"))  # works from any directory
RECIPE = ROOT / "recipes" / "dicom_modality.yaml"


def plain_loop(folder: Path, run_dir: Path) -> tuple[dict[str, np.ndarray], int, float, list[np.ndarray]]:
    """One file at a time, in this process: read, decode, window, preprocess, model.

    Also returns the first 512 unnormalised inputs (the batches' dtype, float32 here), for the engine-only table.
    """
    recipe, meta, bundle = load_run(run_dir, torch.device("cpu"))
    transform = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std)
    spec = dicom_spec(recipe.data.dicom)
    raw = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std, normalize=False)
    temperature = float(meta["decision"]["temperature"])
    model = bundle.model.eval()
    probs: dict[str, np.ndarray] = {}
    inputs: list[np.ndarray] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for path in walk_files(folder):
            try:
                pixels, _ = read_dicom(path, spec)
            except (NotADicomImage, DicomReadError):  # skipped or error rows in medvision; not timed here
                continue
            x = prepare(pixels[0], recipe.data.intensity, bundle.in_chans, transform)[None]
            x = x.contiguous(memory_format=torch.channels_last) if recipe.train.channels_last else x
            p = torch.softmax(model(x).float() / temperature, 1)[0].numpy()  # calibrated, as score writes them
            probs[path.relative_to(folder).as_posix()] = p
            if len(inputs) < 512:
                inputs.append(prepare(pixels[0], recipe.data.intensity, bundle.in_chans, raw).numpy())
    return probs, len(probs), time.perf_counter() - start, inputs


def engine_only(run_dir: Path, onnx_path: Path, batches: list[np.ndarray], threads: int, repeats: int = 3) -> dict:
    """img/s of each engine alone on the same batches (median of ``repeats`` passes after one warm-up pass)."""
    from medvision.tasks.export.onnx import load_onnx

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_engine, _, _ = load_scorer(run_dir, "torch")
        ort_engine, _ = load_onnx(onnx_path, threads)
        out = {}
        for engine in (torch_engine, ort_engine):
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                for batch in batches:
                    engine.predict(batch)
                times.append(time.perf_counter() - start)
            out[engine.name] = sum(len(b) for b in batches) / float(np.median(times[1:]))
        return out
    finally:
        torch.set_num_threads(saved)


def _probs(out: Path) -> dict[str, np.ndarray]:
    with out.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    classes = [c[len("prob_") :] for c in rows[0] if c.startswith("prob_")]
    return {r["path"]: np.array([float(r[f"prob_{c}"]) for c in classes]) for r in rows}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys(), "the methods scored different files"
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of each source file")
    parser.add_argument("--model", type=Path, help="a finished run; default: train recipes/dicom_modality.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed scoring runs of each engine, alternating")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("score_dicom.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # the corpus's damaged sources; each is left out
    warnings.filterwarnings("ignore", module="pydicom")  # invalid VRs in pydicom's deliberately odd test files
    work = Path(tempfile.mkdtemp(prefix="medvision-score-bench-"))
    run_dir = args.model
    if run_dir is None:
        train_corpus = work / "train"
        make_corpus(train_corpus, 2)
        recipe = load_recipe(RECIPE, [f"data.path={train_corpus}", f"output_dir={work / 'runs'}"])
        run_dir = train(recipe)
    exported = export_onnx(run_dir, work / "model.onnx")
    print("\n".join(exported.lines()))
    corpus = work / "score"
    n_files = make_corpus(corpus, args.copies)
    size_mb = sum(p.stat().st_size for p in walk_files(corpus)) / 1e6
    print(f"{n_files} DICOM files ({size_mb:.0f} MB) in {corpus}; model {run_dir}")

    plain, n_plain, t_plain, inputs = plain_loop(corpus, run_dir)
    engines = (("torch", run_dir), ("onnxruntime", exported.path))
    warm = work / "warm-up"  # starts the decode workers' forkserver (imports, once per process) before any timing
    for path in sorted(walk_files(corpus))[:8]:
        (warm / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, warm / path.parent.name / path.name)
    for engine, model in engines:
        score_folder(warm, model, work / f"warm-{engine}.csv", workers=args.workers, engine=engine)
    summaries: dict[str, list[ScoreSummary]] = {engine: [] for engine, _ in engines}
    probs = {}
    for repeat in range(args.repeats):  # alternating, so that neither engine always runs on a warmer machine
        for engine, model in engines:
            out = work / f"scores-{engine}-{repeat}.csv"
            summaries[engine].append(score_folder(corpus, model, out, batch_size=args.batch_size,
                                                  workers=args.workers, engine=engine))  # fmt: skip
            probs[engine] = _probs(out)
    plain_rate = n_plain / t_plain
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime {ort.__version__}"
    results = [{"method": "plain loop (1 process, batch 1)", "images": n_plain, "seconds": t_plain,
                "img_s": plain_rate, "ratio": 1.0, "runs_img_s": f"{plain_rate:.1f}", "max_prob_diff": 0.0,
                "vs": "-"}]  # fmt: skip
    for engine, runs in summaries.items():
        seconds = float(np.median([s.seconds for s in runs]))
        rates = ", ".join(f"{s.images_per_second:.1f}" for s in runs)
        results.append({
            "method": f"medvision score --engine {engine} ({args.workers} workers, batch {args.batch_size})",
            "images": runs[0].images_now, "seconds": seconds, "img_s": runs[0].images_now / seconds,
            "ratio": runs[0].images_now / seconds / plain_rate, "runs_img_s": rates,
            "max_prob_diff": _max_diff(probs[engine], plain if engine == "torch" else probs["torch"]),
            "vs": "plain loop" if engine == "torch" else "medvision torch",
        })  # fmt: skip

    batch = args.batch_size
    stacked = [np.stack(inputs[i : i + batch]) for i in range(0, len(inputs) - batch + 1, batch)][:16]
    threads = sorted({max(1, (os.cpu_count() or 1) - args.workers), os.cpu_count() or 1})
    alone = {t: engine_only(run_dir, exported.path, stacked, t) for t in threads}
    for t, rates in alone.items():
        for engine, rate in rates.items():
            results.append({"method": f"{engine} alone ({t} thread(s), batch {batch})",
                            "images": len(stacked) * batch, "seconds": len(stacked) * batch / rate, "img_s": rate,
                            "ratio": rate / rates["torch"], "runs_img_s": "", "max_prob_diff": "",
                            "vs": "torch alone"})  # fmt: skip

    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*results[0], "files", "machine"])
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "files": n_files, "machine": machine})
    print(f"\nmachine: {machine}\n")
    print(f"| method | images | median s ({args.repeats} runs) | img/s | img/s of each run | vs plain loop | "
          "max abs prob diff (against) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results[:3]:
        diff = "-" if r["vs"] == "-" else f"{r['max_prob_diff']:.1e} ({r['vs']})"
        print(f"| {r['method']} | {r['images']} | {r['seconds']:.1f} | {r['img_s']:.1f} | {r['runs_img_s']} | "
              f"{r['ratio']:.2f}x | {diff} |")  # fmt: skip
    print(f"\nonnxruntime vs torch, whole scoring run: {results[2]['img_s'] / results[1]['img_s']:.2f}x\n")
    print("| engine alone, same preprocessed batches | images | img/s | vs torch |")
    print("| --- | --- | --- | --- |")
    for r in results[3:]:
        print(f"| {r['method']} | {r['images']} | {r['img_s']:.1f} | {r['ratio']:.2f}x |")
    for engine, runs in summaries.items():
        print(f"{engine}: {runs[-1].line()}")
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()
