"""The ``medvision`` command: parse, load the recipe, call the library. Nothing else lives here.

The parser needs only :mod:`medvision.options`, so ``medvision --help`` and a mistyped option answer at once
(0.44 s, where importing every task first took 5.9 s on 2 cores); a command imports its task once it is
understood. ``score`` and ``features`` first start the forkserver their worker pools fork from, so that it imports
the workers' code on another core while this process imports torch and the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from medvision.errors import MedvisionError
from medvision.options import (
    EXIT_FILE_ERRORS,
    EXIT_NO_IMAGES,
    EXPORT_FORMATS,
    FILE_TIMEOUT,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    SCORE_AMP,
    SLIDE_TIMEOUT,
    parse_shard,
)
from medvision.recipe import load_recipe
from medvision.workers import start_forkserver

#: What a user can cause and read: one line, exit 2. FileNotFoundError covers a path given on the command line.
USER_ERRORS = (MedvisionError, FileNotFoundError)


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a recipe's several problems are joined with ``; ``)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()).replace(":; ", ": ")


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses a value and refuses, naming it, one outside its range: a count of 0, a
    size of -1 or an MPP of nan is an error before any work, never an internal error later nor a silent default."""

    def check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    return check


_positive = _checked(int, lambda n: n >= 1, "a whole number >= 1")
_count = _checked(int, lambda n: n >= 0, "a whole number >= 0")
_positive_float = _checked(float, lambda x: math.isfinite(x) and x > 0, "a number > 0")
_fraction = _checked(float, lambda x: 0.0 <= x <= 1.0, "a number from 0 to 1")


def _nproc_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=_positive, metavar="N",
                   help="run on N processes of this machine (launches torchrun: gloo on CPUs, NCCL with a GPU "
                        "each); for several machines run torchrun yourself (see the README)")  # fmt: skip


def _slide_run(model: Path) -> bool:
    """Whether ``model`` is a run folder trained on whole slides (its recipe's ``data.source``)."""
    recipe = model / "recipe.yaml"
    if not recipe.is_file():
        return False
    try:
        tree = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError:
        return False  # load_run reports the damaged recipe
    return isinstance(tree, dict) and (tree.get("data") or {}).get("source") in ("slides", "slide_features")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvision", description="Transfer learning on medical images.")
    sub = parser.add_subparsers(dest="command", required=True)

    for command, what, example in (("train", "fine-tune a backbone from a YAML recipe", "train.phases[1].lr=3e-4"),
                                   ("pretrain", "self-supervised pretraining (SimCLR) on a recipe's images, labels "
                                    "ignored", "pretrain.epochs=50")):  # fmt: skip
        p = sub.add_parser(command, help=what)
        p.add_argument("recipe", nargs="?", help="recipe YAML (omit with --resume RUN_DIR)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a recipe value, e.g. --set {example} (repeatable)")  # fmt: skip
        p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
        p.add_argument("--deterministic", action="store_true",
                       help="bit-identical reruns on the same machine (sets train.deterministic)")  # fmt: skip
        p.add_argument("--track", action="store_true",
                       help="log the run to MLflow (sets tracking.mlflow; the store is tracking.uri)")  # fmt: skip
        _nproc_option(p)

    p = sub.add_parser("evaluate", help="re-score a trained run on its test split or another dataset")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", help="another dataset (.npz, .csv manifest or class folder) with the same classes")
    p.add_argument(
        "--source", choices=["npz", "csv", "folder", "dicom"], help="kind of --data (default: from its suffix)"
    )
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="which split to score (default: test, or all with --data)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval/<name>)")
    p.add_argument("--allow-seen", action="store_true",
                   help="evaluate --data that holds images the run trained or validated on (refused by default); "
                        "the report and metrics.json count them")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="how the data is read, e.g. data.on_error=skip (repeatable); the rest of the recipe is "
                        "the run's own")  # fmt: skip
    _nproc_option(p)

    p = sub.add_parser(
        "score",
        help="score every image in a folder (DICOM, or PNG/JPEG/TIFF), or every slide for a slide-trained run",
        description="Exit codes: 0 every image file scored; 2 the model cannot be loaded; "
        "3 some files are error rows (all rows are written); 4 no image file found.",
    )
    p.add_argument("folder", type=Path, help="folder searched recursively")
    p.add_argument("--model", type=Path, required=True, metavar="RUN_DIR",
                   help="a finished medvision run (or, with --engine onnxruntime, its exported .onnx)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="scores.csv (or .parquet); re-run to resume")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                   help="PyTorch, or the run's ONNX export in ONNX Runtime (default: %(default)s)")  # fmt: skip
    p.add_argument("--amp", choices=SCORE_AMP, default="none",
                   help="PyTorch precision: none = float32, the same function as the ONNX export (default); auto = "
                        "bf16/fp16 where the hardware runs it natively, faster, probabilities differ by up to ~0.2 "
                        "on images the model is unsure of")  # fmt: skip
    p.add_argument("--file-timeout", type=_positive_float, default=None, metavar="S",
                   help=f"seconds per file (a slide run: per slide, opening it and finding its tissue), then it is an "
                        f"error row (default: {FILE_TIMEOUT:g} a file, {SLIDE_TIMEOUT:g} a slide as features "
                        "allows)")  # fmt: skip
    p.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                   help="most values (rows x cols x samples) a header may declare (default: %(default)d)")  # fmt: skip
    p.add_argument("--max-file-size", type=_positive_float, default=MAX_FILE_BYTES / 2**30, metavar="GIB",
                   help="larger files are error rows, never read (default: %(default)g GiB)")  # fmt: skip
    p.add_argument("--encoder-checkpoint", metavar="PATH",
                   help="a run trained on cached slide features: its encoder's weights (default: "
                        "$MEDVISION_ENCODER_<NAME>); checked against the run's SHA-256")  # fmt: skip
    p.add_argument("--include-tags", default="", metavar="TAG,TAG",
                   help="opt in to extra DICOM tags as columns, e.g. AccessionNumber (none by default)")  # fmt: skip
    p.add_argument("--uids", action="store_true",
                   help="add each DICOM file's SOP, Study and Series Instance UID as columns; they identify the "
                        "patient's study, so they are off by default")  # fmt: skip
    p.add_argument(
        "--shard", default=(0, 1), type=_shard, metavar="I/N", help="score only shard I of N (deterministic)"
    )
    p.add_argument("--batch-size", type=_positive, default=16, help="images per model batch (default: %(default)s)")
    p.add_argument("--workers", type=_count,
                   help="decode worker processes (default: min(4, cores) for files; for slides one per model "
                        "thread on a CPU, at most 8, reading while it waits, and every core but one beside a GPU); "
                        "0 decodes in-process, without crash isolation")  # fmt: skip
    _nproc_option(p)

    p = sub.add_parser(
        "features",
        help="embed every slide's tissue tiles with a frozen pathology encoder: one HDF5 file per slide",
        description="Exit codes: 0 every slide embedded; 2 the encoder cannot be loaded; 3 some slides are error "
        "rows (all rows are written); 4 no slide found. Re-run with the same --out to resume.",
    )
    p.add_argument("folder", type=Path, help="slides folder, searched recursively (a DICOM WSI is a series folder)")
    p.add_argument("--encoder", required=True, metavar="NAME",
                   help="uni, uni2-h, virchow2, h-optimus-0, prov-gigapath, phikon-v2, or timm:<model>")  # fmt: skip
    p.add_argument("--checkpoint", metavar="PATH",
                   help="local weights (a folder for phikon-v2); default: $MEDVISION_ENCODER_<NAME>; 'hub' "
                        "downloads (needs access and network)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for the .h5 files, features.csv and .json")
    p.add_argument("--tile-size", type=_positive, help="tile side in pixels at --target-mpp (default: the encoder's)")
    p.add_argument("--target-mpp", type=_positive_float, help="µm/px of the tiles (default: the encoder's, else 0.5)")
    p.add_argument("--min-tissue", type=_fraction, default=0.5, help="least tissue fraction of a tile (default: 0.5)")
    p.add_argument("--max-tiles", type=_positive, help="at most this many tiles a slide (seeded choice; default: all)")
    p.add_argument("--mpp", type=_positive_float, help="level-0 µm/px of every slide, for scans whose files lack it")
    p.add_argument("--stain-reference", metavar="PNG", help="Macenko-normalise every tile to this tile's stains")
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide", "dicom"], default="auto")
    p.add_argument("--no-jpeg-shrink", action="store_true",
                   help="decode JPEG tiles at full size and area-average (OpenSlide's pixels), never shrinking in "
                        "the decoder (about 2x slower reading)")  # fmt: skip
    p.add_argument("--amp", choices=SCORE_AMP, default="none",
                   help="none = float32 (default); auto = bf16/fp16 where the hardware runs it natively")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=32, help="tiles per encoder batch (default: %(default)s)")
    p.add_argument("--workers", type=_count,
                   help="tile-reading processes (default: on a CPU one per encoder thread, at most 8, reading "
                        "while it waits; beside a GPU every core but one, shared among torchrun ranks; 0 reads "
                        "in-process, without crash isolation)")  # fmt: skip
    p.add_argument("--slide-timeout", type=_positive_float, default=SLIDE_TIMEOUT, metavar="S",
                   help="seconds a slide may take to open and find its tissue (default: %(default)g)")  # fmt: skip
    p.add_argument(
        "--shard", default=(0, 1), type=_shard, metavar="I/N", help="embed only shard I of N (deterministic)"
    )
    _nproc_option(p)

    p = sub.add_parser("explain", help="Grad-CAM heatmaps: of given images, or of a run's most confident errors")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", nargs="+", type=Path, metavar="FILE",
                   help="PNG/JPEG/TIFF or DICOM files (default: the test split's most confident errors)")  # fmt: skip
    p.add_argument("--method", choices=["gradcam", "gradcam++"], help="default: the recipe's evaluation.explain_method")
    p.add_argument("--target", metavar="CLASS", help="class to explain (default: the predicted class)")
    p.add_argument("-n", type=_positive, help="errors of each kind to show, at least 1 (default: the recipe's "
                   "evaluation.explain, or 4 where it is 0)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/explain)")

    p = sub.add_parser("benchmark", help="speed of timm backbones, one recipe's accuracy across backbones, or its "
                       "label efficiency")  # fmt: skip
    modes = p.add_subparsers(dest="mode", required=True)
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--backbones", required=True, metavar="A,B,...", help="timm model names, comma separated")
    timing.add_argument("--out", type=Path, default=Path("benchmark-results"),
                        help="folder for the CSV, table and plot (default: %(default)s)")  # fmt: skip
    timing.add_argument("--warmup", type=_count, help="untimed steps first (default: 10 on a GPU, 2 on a CPU)")
    timing.add_argument(
        "--repeats", type=_positive, help="timed repeats; the median is reported (default: 5 GPU, 3 CPU)"
    )
    timing.add_argument("--steps", type=_positive, help="steps per timed repeat (default: 10 GPU, 2 CPU)")

    p = modes.add_parser("speed", parents=[timing], help="params, GFLOPs, img/s, latency, memory and MFU per backbone")
    p.add_argument("--image-size", type=_positive, help="square input side (default: 224 on a GPU, 64 on a CPU)")
    p.add_argument("--batch-size", type=_positive, help="images per step (default: 256 on a GPU, 32 on a CPU)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype; auto: bf16 where native, else fp16 on a GPU, fp32 on a CPU")  # fmt: skip
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="NHWC layout")
    p.add_argument("--compile", action="store_true", help="wrap each model in torch.compile")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    p.add_argument("--in-chans", type=_positive, default=3, help="input channels")
    p.add_argument(
        "--num-classes", type=_positive, default=1000, help="classifier outputs (1000 matches timm's counts)"
    )
    p.add_argument("--peak-size", type=_positive, help="side of the peak-TFLOP/s matmul (default: 8192 GPU, 2048 CPU)")

    p = modes.add_parser("recipe", parents=[timing], help="fine-tune one recipe per backbone; AUC vs throughput")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every run (repeatable)")  # fmt: skip
    p.add_argument("--pretrained", choices=["auto", "hub", "none"], default="auto",
                   help="auto: the recipe's weights where they fit (a weights file fits only its own backbone), "
                        "else random init; hub: timm hub weights for all; none: random init for all")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing run folders of the same names")

    p = modes.add_parser("medmnist", help="a recipe over seeds and variants on MedMNIST's official splits, beside "
                         "the published MedMNIST v2 and MedMNIST+ figures")  # fmt: skip
    p.add_argument("recipe", help="recipe YAML on a MedMNIST .npz file (data.source: npz)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every run (repeatable)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2", metavar="A,B,...", help="seeds, comma separated (default: %(default)s)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                   help="a variant of the recipe (repeatable); the first is the reference of the paired deltas "
                        "(default: base, the recipe as it is)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("medmnist-benchmark"), help="output folder (default: %(default)s)")
    p.add_argument("--resamples", type=_positive, default=1000, help="bootstrap resamples of the paired deltas")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")

    p = modes.add_parser("labels", help="label-efficiency curves: test AUC/ACC against label fraction, per init "
                         "and protocol")  # fmt: skip
    p.add_argument("recipe", help="recipe YAML (its data, model and phases; each run overrides the rest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every run (repeatable)")  # fmt: skip
    p.add_argument("--fractions", default="0.01,0.05,0.1,0.25,1.0", help="label fractions (default: %(default)s)")
    p.add_argument("--inits", default="imagenet,random",
                   help="imagenet, random and/or run folders to init_from, e.g. a medvision pretrain run "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--protocols", default="finetune,linear_probe",
                   help="finetune, linear_probe, knn (default: %(default)s)")  # fmt: skip
    p.add_argument("--seeds", default="3", metavar="N|A,B,...",
                   help="a count of seeds from the recipe's seed on, or the seeds themselves, comma separated, as "
                        "benchmark medmnist takes them (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-steps", type=_positive, default=100, metavar="N",
                   help="finetune runs at small fractions repeat their phases' epochs until they take at least N "
                        "optimizer steps (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("label-efficiency"),
                   help="folder for the runs, CSVs, table and plot (default: %(default)s)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="retrain finished runs instead of reusing them")
    p.add_argument("--track", action="store_true",
                   help="log the benchmark to MLflow, each grid run a child run (sets tracking.mlflow)")  # fmt: skip

    p = sub.add_parser(
        "export",
        help="write a run as a deployable model: ONNX (for ONNX Runtime) or a MONAI bundle",
        description="The export is checked against the run's PyTorch model on the run's own test images and "
        "kept only if it passes. Exit codes: 0 written and checked; 2 the run cannot be loaded or the export "
        "fails a check (nothing is written).",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", dest="fmt", required=True, choices=EXPORT_FORMATS, help="onnx or monai-bundle")
    p.add_argument("--out", type=Path,
                   help="default: RUN_DIR/export/model.onnx, or RUN_DIR/export/monai_bundle for a bundle")  # fmt: skip
    p.add_argument("--parity-images", type=_count, default=32, metavar="N",
                   help="test images the export is checked on (default: %(default)s; 0 skips the check)")  # fmt: skip

    p = sub.add_parser(
        "compare",
        help="compare runs tested on the same images: AUC/ACC with CIs, paired differences, DeLong, ROC curves",
        description="Reads each run's predictions.csv (no model is run). Exit codes: 0 compared; 2 a run cannot "
        "be read, or the runs differ in classes, images or labels.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders; the first is the reference")
    p.add_argument("--split", default="test", help="the split of predictions.csv to compare (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("compare"), metavar="DIR",
                   help="folder for compare.md, .html, .json and plots/ (default: %(default)s)")  # fmt: skip
    p.add_argument("--resamples", type=_positive, default=1000, metavar="N", help="bootstrap resamples (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")

    p = sub.add_parser("demo", help="generate a synthetic H&E dataset and train on it (offline, ~1 min)")
    p.add_argument("--out", type=Path, default=Path("medvision-demo"), help="folder for data and run")
    p.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                   help="training precision: auto = bf16 where the device runs it natively (a CPU with native "
                        "bf16, a bf16 GPU), fp16 on a CUDA GPU without bf16, else fp32; none pins fp32, the "
                        "precision of the README's figures (default: %(default)s)")  # fmt: skip
    return parser


def _launch(argv: list[str], nproc: int, command: str, out: Path | None) -> int:
    """``medvision CMD ... --nproc N``: the same command on N local ranks, launched by PyTorch's torchrun.

    Under torchrun every rank exits 0 unless it fails (torchrun stops all ranks when one exits
    otherwise); the exit code of a distributed ``score`` is in its sidecar, and returned from there.

    SIGTERM, SIGINT and SIGHUP sent to this process are passed on to torchrun, which stops its ranks (torchrun runs
    in a session of its own, so a Ctrl-C reaches it once, through here); this process waits for it and returns
    128 + the signal's number when it ended on one, so a stopped job never leaves ranks writing ``--out``.
    """
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "medvision", *rest]  # fmt: skip
    child: list[subprocess.Popen[bytes]] = []
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = {s: signal.signal(s, forward) for s in stops}  # before the start: no signal falls between the two
    try:
        child.append(subprocess.Popen(cmd, start_new_session=True))
        if received:  # one came while it was starting
            child[0].send_signal(received[-1])
        code = child[0].wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if received and code != 0:
        return 128 + received[-1]
    code = 128 - code if code < 0 else code  # torchrun itself killed by a signal
    sidecar = None
    if out is not None and command in ("score", "features"):
        sidecar = out / "features.json" if command == "features" else Path(f"{out}.json")
    if code == 0 and sidecar is not None and sidecar.is_file():
        return int(json.loads(sidecar.read_text()).get("exit_code", 0))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("timm").setLevel(logging.WARNING)
    if args.command in ("score", "features") and args.workers != 0 and not getattr(args, "nproc", None):
        start_forkserver()  # it imports the workers' code on another core while this process imports the task
    # the library, once the command is understood (the parser needs none of it)
    from medvision.runs import RunError
    from medvision.runtime import launched_by_torchrun, teardown

    if getattr(args, "nproc", None) and not launched_by_torchrun():
        try:
            return _launch(argv, args.nproc, args.command, getattr(args, "out", None))
        except MedvisionError as err:
            print(f"medvision {args.command}: error: {err}", file=sys.stderr)
            return 2
    ranked = launched_by_torchrun()
    if ranked and int(os.environ.get("RANK", 0)) > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # one rank prints: rank 0 (errors still reach stderr)
    try:
        if args.command in ("train", "pretrain"):
            if args.command == "pretrain":
                from medvision.tasks.pretrain import pretrain as job
            else:
                from medvision.tasks.train import train as job
            if args.resume:
                if args.recipe or args.overrides or args.deterministic:
                    raise RunError("--resume continues a run with its saved recipe; give no RECIPE, --set or "
                                   "--deterministic")  # fmt: skip
                run_dir = Path(args.resume)
                recipe = load_recipe(run_dir / "recipe.yaml")
                recipe = recipe.changed({"output_dir": str(run_dir.resolve().parent), "name": run_dir.resolve().name,
                                         **({"tracking.mlflow": True} if args.track else {})})  # fmt: skip
                out = job(recipe, resume=True)
            elif args.recipe:
                overrides = [*args.overrides, *(["train.deterministic=true"] if args.deterministic else []),
                             *(["tracking.mlflow=true"] if args.track else [])]  # fmt: skip
                out = job(load_recipe(args.recipe, overrides), overwrite=args.overwrite)
            else:
                raise RunError("give a RECIPE, or --resume RUN_DIR")
            if args.command == "train":
                print(f"report: {out / 'report.html'}")
            else:
                print(f"pretrained backbone: {out / 'model.safetensors'}  (fine-tune with --set model.init_from={out})")
        elif args.command == "evaluate":
            from medvision.tasks.evaluate import evaluate_run

            out, metrics = evaluate_run(
                args.run_dir, args.data, args.source, args.split, args.out, args.overrides, allow_seen=args.allow_seen
            )
            print(f"AUC {metrics['auc']:.4f}  accuracy {metrics['acc']:.4f}  n={metrics['n']}")
            print(f"metrics: {out / 'metrics.json'}")
            print(f"report: {out / 'report.html'}")
        elif args.command == "score":
            from medvision.tasks.score import nothing_to_score, score_folder, score_slides

            if not args.folder.is_dir():
                print(f"medvision score: error: {args.folder} is not a folder", file=sys.stderr)
                return EXIT_NO_IMAGES
            tags = [t.strip() for t in args.include_tags.split(",") if t.strip()]
            if _slide_run(args.model):  # a run trained on whole slides scores slides: one row per slide
                if args.uids:
                    print("medvision score: error: --uids applies to runs scored file by file; slide rows carry no "
                          "UIDs", file=sys.stderr)  # fmt: skip
                    return 2
                summary = score_slides(args.folder, args.model, args.out, args.shard, args.batch_size, args.workers,
                                       args.engine, args.file_timeout or SLIDE_TIMEOUT, amp=args.amp,
                                       encoder_checkpoint=args.encoder_checkpoint)  # fmt: skip
            else:
                summary = score_folder(args.folder, args.model, args.out, tags, args.shard, args.batch_size,
                                       args.workers, args.engine, args.file_timeout or FILE_TIMEOUT, args.max_pixels,
                                       int(args.max_file_size * 2**30), amp=args.amp, uids=args.uids)  # fmt: skip
            print(summary.line())
            if ranked:  # torchrun stops every rank when one exits non-zero: the code is in the sidecar
                print(f"exit code {summary.exit_code} (recorded in {args.out}.json)")
                return 0
            if summary.exit_code == EXIT_FILE_ERRORS:
                print(f"medvision score: {summary.error_files} file(s) could not be scored; their rows in {args.out} "
                      "say why (status error)", file=sys.stderr)  # fmt: skip
            elif summary.exit_code == EXIT_NO_IMAGES:
                why = nothing_to_score(args.folder, summary)
                print(f"medvision score: error: {why}", file=sys.stderr)
            return summary.exit_code
        elif args.command == "features":
            from medvision.recipe import SlidesConfig
            from medvision.tasks.features import TABLE, extract_features

            if not args.folder.is_dir():
                print(f"medvision features: error: {args.folder} is not a folder", file=sys.stderr)
                return EXIT_NO_IMAGES
            slides = None
            if (
                any(
                    v is not None
                    for v in (args.tile_size, args.target_mpp, args.max_tiles, args.mpp, args.stain_reference)
                )
                or args.min_tissue != 0.5
                or args.backend != "auto"
                or args.no_jpeg_shrink
            ):
                from medvision.models.encoders import encoder_spec

                spec = encoder_spec(args.encoder)
                slides = SlidesConfig(tile_size=args.tile_size or spec.tile_size,
                                      target_mpp=args.target_mpp or spec.mpp or 0.5, min_tissue=args.min_tissue,
                                      max_tiles_per_slide=args.max_tiles, mpp=args.mpp,
                                      stain_reference=str(Path(args.stain_reference).resolve())
                                      if args.stain_reference else None, backend=args.backend,
                                      jpeg_shrink=not args.no_jpeg_shrink)  # fmt: skip
            summary = extract_features(args.folder, args.out, args.encoder, args.checkpoint, slides=slides,
                                       batch_size=args.batch_size, workers=args.workers, shard=args.shard,
                                       amp=args.amp, slide_timeout=args.slide_timeout)  # fmt: skip
            print(summary.line().replace("file(s)", "slide(s)").replace(" scored (", " embedded ("))
            print(f"features: {args.out}/*.h5, index {args.out / TABLE}")
            if ranked:
                return 0
            if summary.exit_code == EXIT_FILE_ERRORS:
                print(f"medvision features: {summary.error_files} slide(s) could not be embedded; their rows in "
                      f"{args.out / TABLE} say why (status error)", file=sys.stderr)  # fmt: skip
            elif summary.exit_code == EXIT_NO_IMAGES:
                from medvision.tasks.score import nothing_to_score

                print(f"medvision features: error: {nothing_to_score(args.folder, summary, 'slide to embed')}",
                      file=sys.stderr)  # fmt: skip
            return summary.exit_code
        elif args.command == "explain":
            from medvision.tasks.explain import explain_errors, explain_images

            out = args.out or args.run_dir / "explain"
            if args.images:
                written = explain_images(args.run_dir, args.images, out, args.method, args.target)
            elif args.target:
                raise RunError("--target applies to --images; the error panel explains each image's predicted class")
            else:
                written = explain_errors(args.run_dir, out, method=args.method, n=args.n)
                if not written:
                    print(f"no misclassified images in the test split of {args.run_dir}: nothing to explain; "
                          "to see where the model looks on given images, pass --images FILE ...")  # fmt: skip
                    return 0
            print(f"wrote {len(written)} overlay(s) to {out}")
        elif args.command == "benchmark":
            from medvision.tasks.benchmark import speed as bench

            if args.mode == "medmnist":
                from medvision.tasks.benchmark import medmnist as mm

                seeds = mm.parse_seeds(args.seeds)  # before the recipe: a bad --seeds fails at once
                found = mm.medmnist_benchmark(load_recipe(args.recipe, args.overrides), seeds,
                                              [mm.parse_variant(v) for v in args.variants], args.out, args.overwrite,
                                              args.resamples)  # fmt: skip
                print(found.markdown)
                print("wrote " + ", ".join(str(f) for f in found.files))
                return 1 if all(row.error for row in found.rows) else 0
            if args.mode == "labels":
                from medvision.tasks.benchmark import labels as le

                overrides = [*args.overrides, *(["tracking.mlflow=true"] if args.track else [])]
                grid_seeds = le.parse_seed_count(args.seeds)  # before the recipe: a bad --seeds fails at once
                grid = le.label_benchmark(load_recipe(args.recipe, overrides), le.parse_fractions(args.fractions),
                                          le.parse_inits(args.inits), le.parse_protocols(args.protocols), grid_seeds,
                                          args.out, args.min_steps, args.overwrite)  # fmt: skip
                print(grid.markdown)
                print("wrote " + ", ".join(str(f) for f in grid.files))
                return 1 if all(row.error for row in grid.rows) else 0
            names = bench.parse_backbones(args.backbones)
            if args.mode == "speed":
                cfg = bench.speed_config(args.device, args.amp, image_size=args.image_size,
                                         batch_size=args.batch_size, channels_last=args.channels_last,
                                         compile=args.compile, warmup=args.warmup, repeats=args.repeats,
                                         steps=args.steps, in_chans=args.in_chans,
                                         num_classes=args.num_classes)  # fmt: skip
                result = bench.speed_benchmark(names, cfg, args.out, args.peak_size)
            else:
                result = bench.recipe_benchmark(load_recipe(args.recipe, args.overrides), names, args.out,
                                                args.pretrained, args.overwrite, args.warmup, args.repeats,
                                                args.steps)  # fmt: skip
            print(result.markdown)
            print("wrote " + ", ".join(str(f) for f in result.files))
            if all(row.error for row in result.rows):
                print("medvision benchmark: error: no backbone could be measured", file=sys.stderr)
                return 1
        elif args.command == "export":
            from medvision.tasks.export import export_run

            exported = export_run(args.run_dir, args.fmt, args.out, args.parity_images)
            print("\n".join(exported.lines()))
        elif args.command == "compare":
            from medvision.tasks.compare import compare_runs

            compared = compare_runs(args.runs, args.split, args.out, args.resamples, args.seed)
            print(compared.markdown)
            print("wrote " + ", ".join(str(f) for f in compared.files))
        elif args.command == "demo":
            from medvision.tasks.demo import run_demo

            out = run_demo(args.out, args.amp)
            amp = json.loads((out / "run.json").read_text()).get("amp", "none")
            print(f"precision: {'fp32' if amp == 'none' else amp} (train.amp {args.amp}); the demo page's figures "
                  "are fp32 (`medvision demo --amp none`) and bf16 on a 2-core Intel Xeon: the numbers move with the "
                  "precision, the CPU and the torch version")  # fmt: skip
            print(f"report: {out / 'report.html'}")
    except USER_ERRORS as err:
        print(f"medvision {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not the user's input: still one line, the traceback on request
        if os.environ.get("MEDVISION_DEBUG"):
            raise
        print(f"medvision {args.command}: internal error: {type(err).__name__}: {_one_line(err)} (a bug in medvision; "
              "MEDVISION_DEBUG=1 shows the traceback)", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
