"""Backbone benchmarks: speed (throughput, latency, memory, FLOPs, MFU) and accuracy (one recipe, many backbones).

Both modes run the same code on a GPU and on a CPU; only the defaults shrink on a CPU. Every table
records the device it was measured on (GPU model, or CPU model from ``/proc/cpuinfo``), so a CPU
number is never mistaken for a GPU one.

Conventions, written into every table header as well:

* **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward image, which
  counts a multiply-add as 2 FLOPs (so "GFLOPs" here is twice the "GMACs" of many model cards);
  BatchNorm, activations and other elementwise work are not counted.
* **Training FLOPs** are 3x the forward (forward + backward for inputs and weights), the usual model-
  FLOPs convention of MFU. The backward is not counted with ``FlopCounterMode``: its convolution
  backward formula ignores ``groups`` in the weight gradient, overcounting it ``groups``-fold (the
  channel count of a depthwise conv), which would inflate the MFU of EfficientNets, MobileNets, ConvNeXts.
* **MFU** is achieved model TFLOP/s (FLOPs per image x median images/s) over the device's *measured*
  peak: the median TFLOP/s of a large square matmul in the run's compute dtype (bf16/fp16 under AMP,
  else fp32), timed once per run. It is a fraction of what this device does on a matmul, not of a
  datasheet number. (With ``amp none`` on a GPU, cuDNN convolutions may use TF32 while the fp32 matmul
  does not, so MFU can exceed 1 there.)
* **Timing**: ``warmup`` untimed steps (they absorb cuDNN autotuning and ``torch.compile``), then
  ``repeats`` timed blocks of ``steps`` steps, bracketed by CUDA events on a GPU (kernel time, not
  launch time) and by the host clock on a CPU. Reported: the median block, with the min-max spread.
  Inputs are random normal images and random labels, never zeros.
* **Memory**: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset, per backbone and mode
  (weights, optimizer state and activations). A CPU has no per-allocation peak counter, and process RSS
  is monotonic and reuses freed memory, so on a CPU memory is reported as not measured rather than as a
  misleading number.
"""

from __future__ import annotations

import difflib
import gc
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medvision.errors import MedvisionError
from medvision.models.backbone import create_backbone
from medvision.recipe import ModelConfig, Recipe
from medvision.runs import read_metrics_json, read_run_json
from medvision.runtime import autocast, resolve_amp
from medvision.tasks.benchmark import report
from medvision.tasks.benchmark.report import ModeResult, RecipeRow, Report, SpeedRow, Spread, summarize

log = logging.getLogger("medvision")

MODES = ("infer", "train")
PRETRAINED_POLICIES = ("auto", "hub", "none")
_DEFAULTS = {  # per device type: image_size, batch_size, warmup, repeats, steps, peak matmul side
    "cuda": {"image_size": 224, "batch_size": 256, "warmup": 10, "repeats": 5, "steps": 10, "peak_size": 8192},
    "cpu": {"image_size": 64, "batch_size": 32, "warmup": 2, "repeats": 3, "steps": 2, "peak_size": 2048},
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


class BenchmarkError(MedvisionError, ValueError):
    """A benchmark that cannot run as asked; the message names the option, the value and what is allowed."""


def parse_backbones(text: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``: comma separated, blanks dropped, first occurrence kept."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise BenchmarkError(f"--backbones {text!r} names no model; expected e.g. resnet18,efficientnet_b0")
    return names


def check_backbone(name: str) -> None:
    """Raises BenchmarkError with the closest timm names when ``name`` is not a timm model."""
    if timm.is_model(name.split(".")[0]):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise BenchmarkError(f"backbone {name!r} is not a timm model{hint}")


def device_name(device: torch.device) -> str:
    """The GPU model, or the CPU model and the threads torch uses: what the numbers were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ------------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class SpeedConfig:
    """What every backbone of one speed run is measured with (``amp`` already resolved for the device)."""

    device: torch.device
    image_size: int
    batch_size: int
    amp: str
    channels_last: bool = False
    compile: bool = False
    warmup: int = 2
    repeats: int = 3
    steps: int = 2
    in_chans: int = 3
    num_classes: int = 1000


def speed_config(device: str = "auto", amp: str = "auto", **given: Any) -> SpeedConfig:
    """A SpeedConfig with the device's defaults for every value not given (or given as None).

    A GPU defaults to 224 px, batch 256, 10 warm-up steps and 5 repeats of 10 steps; a CPU to 64 px,
    batch 32, 2 warm-up steps and 3 repeats of 2 steps, so a laptop run finishes in minutes.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise BenchmarkError(f"device {device!r} is not known; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("device 'cuda' was asked for but torch sees no CUDA device; use auto or cpu")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if amp not in ("auto", *_DTYPES):
        raise BenchmarkError(f"amp {amp!r} is not known; expected auto, bf16, fp16 or none")
    if amp == "fp16" and dev.type == "cpu":
        raise BenchmarkError("amp 'fp16' needs a CUDA device (it uses a GradScaler); use bf16 or none on a CPU")
    values = {k: v for k, v in given.items() if v is not None}
    if unknown := sorted(set(values) - {f.name for f in fields(SpeedConfig)} - {"device", "amp"}):
        raise BenchmarkError(
            f"unknown speed option(s) {unknown}; expected some of {[f.name for f in fields(SpeedConfig)]}"
        )
    defaults = {k: v for k, v in _DEFAULTS[dev.type].items() if k != "peak_size"}
    cfg = SpeedConfig(dev, amp=resolve_amp(amp, dev), **(defaults | values))
    for name in ("image_size", "batch_size", "warmup", "repeats", "steps", "in_chans", "num_classes"):
        if getattr(cfg, name) < 1:
            raise BenchmarkError(f"{name} is {getattr(cfg, name)}; expected at least 1")
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds of the first (warm-up) call, and seconds per step of each timed repeat."""

    first_s: float
    per_step_s: list[float]


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int, steps: int) -> Timing:
    """Runs ``warmup`` untimed steps, then ``repeats`` timed blocks of ``steps`` steps.

    CUDA kernels run asynchronously, so the host clock alone would time the launches; on CUDA each
    block is bracketed by events recorded on the stream and read after the end event completes.
    """
    if warmup < 1 or repeats < 1 or steps < 1:
        raise ValueError(f"warmup, repeats and steps must be >= 1; got {warmup}, {repeats}, {steps}")
    synchronize(device)
    start = time.perf_counter()
    step()  # the first call: compilation, cuDNN autotuning, allocator growth
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    per_step = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            per_step.append(begin.elapsed_time(end) / 1e3 / steps)
        else:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            per_step.append((time.perf_counter() - start) / steps)
    return Timing(first, per_step)


def measure_peak_tflops(device: torch.device, amp: str, size: int, warmup: int = 2, repeats: int = 5) -> Spread:
    """TFLOP/s of a ``size`` x ``size`` matmul in the run's compute dtype: the denominator of MFU."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=_DTYPES[amp], generator=g)
    b = torch.randn(size, size, device=device, dtype=_DTYPES[amp], generator=g)
    steps = 10 if device.type == "cuda" else 1
    timing = time_steps(lambda: torch.mm(a, b), device, warmup, repeats, steps)
    return summarize(timing.per_step_s).inverse(2 * size**3 / 1e12)


def count_flops(model: nn.Module, image_size: int, in_chans: int) -> float:
    """Forward FLOPs of one image through ``model`` (a multiply-add is 2).

    Counted in eval mode: BatchNorm statistics are not FLOPs the counter sees, and eval mode lets a
    single image through a 1x1 feature map that training-mode BatchNorm would reject.
    """
    was_training = model.training
    model.eval()
    x = torch.randn(1, in_chans, image_size, image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: SpeedConfig) -> Callable[[], None]:
    """One optimizer step, as ``medvision.training.loop`` takes it: autocast, GradScaler for fp16 only, AdamW."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(cfg.device.type, enabled=cfg.amp == "fp16")

    def step() -> None:
        with autocast(cfg.device, cfg.amp):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _infer_step(model: nn.Module, images: torch.Tensor, cfg: SpeedConfig) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(cfg.device, cfg.amp):
            model(images)

    return step


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _error_text(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return text if isinstance(err, BenchmarkError) else f"{type(err).__name__}: {text}"


def benchmark_backbone(
    name: str, cfg: SpeedConfig, peak_tflops: float | None = None, modes: Sequence[str] = MODES
) -> SpeedRow:
    """Parameters, FLOPs and the speed of each mode (``infer`` and/or ``train``) of one randomly initialised backbone.

    Any failure (an unknown name, out of memory, an unsupported op) becomes the row's ``error``, so one
    bad backbone never loses the others' rows.
    """
    row = SpeedRow(backbone=name)
    try:
        _measure(row, cfg, peak_tflops, modes)
    except Exception as err:  # one row per backbone, whatever went wrong in it
        row.error = _error_text(err)
        log.warning("%s: %s", name, row.error)
    _reset_memory(cfg.device)  # the model, optimizer and batch went with _measure's frame
    return row


def _measure(row: SpeedRow, cfg: SpeedConfig, peak_tflops: float | None, modes: Sequence[str]) -> None:
    """Fills ``row`` in place, so whatever was measured before a failure is kept."""
    if unknown := [m for m in modes if m not in MODES]:
        raise BenchmarkError(f"mode(s) {unknown} not known; expected some of {MODES}")
    check_backbone(row.backbone)
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name=row.backbone), cfg.num_classes, cfg.in_chans).to(cfg.device)
    row.params = sum(p.numel() for p in model.parameters())
    row.gflops = count_flops(model, cfg.image_size, cfg.in_chans) / 1e9
    row.train_gflops = 3 * row.gflops  # the MFU convention; see the module docstring
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    shape = (cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.randn(shape, device=cfg.device).contiguous(memory_format=fmt)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=cfg.device)
    for mode in (m for m in MODES if m in modes):  # inference first: its memory peak holds no optimizer state
        model.train(mode == "train")
        step = _train_step(forward, images, labels, cfg) if mode == "train" else _infer_step(forward, images, cfg)
        _reset_memory(cfg.device)
        timing = time_steps(step, cfg.device, cfg.warmup, cfg.repeats, cfg.steps)
        mem = torch.cuda.max_memory_allocated(cfg.device) / 2**30 if cfg.device.type == "cuda" else float("nan")
        del step  # frees the optimizer state before the next mode
        step_s = summarize(timing.per_step_s)
        img_s = step_s.inverse(cfg.batch_size)
        tflops = (row.train_gflops if mode == "train" else row.gflops) * 1e9 * img_s.median / 1e12
        mfu = tflops / peak_tflops if peak_tflops else float("nan")
        step_ms = Spread(step_s.median * 1e3, step_s.min * 1e3, step_s.max * 1e3)
        row.modes[mode] = ModeResult(img_s, step_ms, tflops, mfu, mem, timing.first_s)


# ------------------------------------------------------------------------------------ speed mode


def run_header(cfg: SpeedConfig) -> dict[str, Any]:
    """What the numbers depend on, written above every table and into every CSV row."""
    return {
        "device": cfg.device.type,
        "device_name": device_name(cfg.device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "amp": cfg.amp,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "in_chans": cfg.in_chans,
        "num_classes": cfg.num_classes,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "steps": cfg.steps,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def speed_benchmark(backbones: Sequence[str], cfg: SpeedConfig, out: Path, peak_size: int | None = None) -> Report:
    """Measures every backbone and writes ``speed.csv``, ``speed.md`` and ``speed.png`` to ``out``.

    Examples:
        >>> cfg = speed_config("auto", "auto", channels_last=True)
        >>> print(speed_benchmark(["resnet18", "efficientnet_b0"], cfg, Path("bench")).markdown)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = run_header(cfg)
    size = peak_size or _DEFAULTS[cfg.device.type]["peak_size"]
    if size < 1:
        raise BenchmarkError(f"peak_size is {size}; expected the side of a square matmul, e.g. 8192")
    log.info("measuring the peak: %s matmul %d x %d on %s", _DTYPES[cfg.amp], size, size, header["device_name"])
    peak = measure_peak_tflops(cfg.device, cfg.amp, size)
    header.update(peak_tflops=peak.median, peak_tflops_min=peak.min, peak_tflops_max=peak.max,
                  peak_matmul=f"{_DTYPES[cfg.amp]} {size}x{size}".replace("torch.", ""))  # fmt: skip
    rows: list[SpeedRow] = []

    def save() -> list[Path]:
        return [report.write_csv(out / "speed.csv", [header | report.speed_record(r) for r in rows]),
                report.write_text(out / "speed.md", report.speed_markdown(header, rows))]  # fmt: skip

    for name in backbones:
        log.info("benchmarking %s", name)
        rows.append(benchmark_backbone(name, cfg, peak.median))
        save()  # after every backbone, so an interrupted run keeps the finished rows
    files = [*save(), report.plot_speed(out / "speed.png", header, rows)]
    return Report(header, rows, report.speed_markdown(header, rows), files)


# ------------------------------------------------------------------------------------ recipe mode


def starting_weights(model: ModelConfig, backbone: str, policy: str) -> tuple[ModelConfig, str]:
    """The model section for ``backbone`` under an init ``policy``, and a label for the table.

    ``auto`` keeps what applies to every architecture (``pretrained: true``, timm's hub) and what
    applies to the recipe's own backbone (a weights file, ``init_from``); any other backbone starts from
    random init, since a weights file for one architecture does not fit another. ``hub`` asks timm's
    hub for every backbone; ``none`` uses random init for all, the fair architecture-only comparison.
    """
    if policy not in PRETRAINED_POLICIES:
        raise BenchmarkError(f"pretrained policy {policy!r} is not known; expected one of {PRETRAINED_POLICIES}")
    own = backbone == model.name
    if policy == "hub" or (policy == "auto" and model.pretrained is True):
        return model.model_copy(update={"name": backbone, "pretrained": True, "init_from": None}), "timm hub"
    if policy == "auto" and own and isinstance(model.pretrained, str):
        return model.model_copy(), f"file {Path(model.pretrained).name}"
    if policy == "auto" and own and model.init_from:
        return model.model_copy(), f"init_from {Path(model.init_from).name}"
    if policy == "auto" and (model.pretrained or model.init_from):
        log.info("%s: the recipe's weights are for %s; %s starts from random init", backbone, model.name, backbone)
    return model.model_copy(update={"name": backbone, "pretrained": False, "init_from": None}), "random init"


def figure(value: Any) -> float:
    """A number read back from ``metrics.json``, where an undefined metric (NaN) was written as null: NaN again."""
    return float("nan") if value is None else float(value)


def _read_run(row: RecipeRow, run_dir: Path, last_phase: str) -> None:
    """Test AUC/ACC with their CIs, training img/s and wall time, from the run's ``metrics.json``."""
    metrics = read_metrics_json(run_dir)
    test = metrics.get("image", {}).get("test", {})
    row.test_auc, row.test_acc = figure(metrics["test"]["auc"]), figure(metrics["test"]["acc"])
    lo, hi = test.get("auc_ci") or (None, None)  # no CIs when evaluation.bootstrap is 0
    row.auc_ci = (figure(lo), figure(hi))
    lo, hi = test.get("acc_ci") or (None, None)
    row.acc_ci = (figure(lo), figure(hi))
    rates = [h["train_img_s"] for h in metrics.get("history", []) if h.get("phase") == last_phase]
    row.train_img_s = float(np.median(rates)) if rates else float("nan")
    row.seconds = figure(metrics.get("seconds"))


def recipe_benchmark(
    recipe: Recipe, backbones: Sequence[str], out: Path, pretrained: str = "auto", overwrite: bool = False,
    warmup: int | None = None, repeats: int | None = None, steps: int | None = None,
) -> Report:  # fmt: skip
    """Fine-tunes ``recipe`` once per backbone, then writes ``recipe.csv``, ``recipe.md`` and ``pareto.png``.

    Each run is ``<recipe name>-<backbone>`` in the recipe's ``output_dir``; its starting weights follow
    ``pretrained`` (see :func:`starting_weights`). Training img/s is the median over the epochs of the
    recipe's last phase, with the real data loader; inference img/s, parameters and memory are measured
    as in speed mode, at the recipe's image size, eval batch size, channels, AMP and ``channels_last``.

    Examples:
        >>> recipe = load_recipe("recipes/bloodmnist_effnet_lite0.yaml")
        >>> recipe_benchmark(recipe, ["tf_efficientnet_lite0", "resnet18"], Path("bench"))
    """
    from medvision.tasks.train import train  # the run module pulls in the whole training and report stack

    if pretrained not in PRETRAINED_POLICIES:
        raise BenchmarkError(f"pretrained policy {pretrained!r} is not known; expected one of {PRETRAINED_POLICIES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = speed_config(recipe.train.device, recipe.train.amp, image_size=recipe.data.image_size,
                        batch_size=recipe.data.eval_batch_size, channels_last=recipe.train.channels_last,
                        compile=recipe.train.compile, warmup=warmup, repeats=repeats, steps=steps)  # fmt: skip
    header = {k: v for k, v in run_header(base).items() if k not in ("in_chans", "num_classes")}
    header.update(recipe=recipe.name, pretrained=pretrained, train_batch_size=recipe.data.batch_size)
    rows: list[RecipeRow] = []

    def save() -> list[Path]:
        return [report.write_csv(out / "recipe.csv", [header | report.recipe_record(r) for r in rows]),
                report.write_text(out / "recipe.md", report.recipe_markdown(header, rows))]  # fmt: skip

    for name in backbones:
        row = RecipeRow(backbone=name)
        rows.append(row)
        try:
            check_backbone(name)
            model, row.init = starting_weights(recipe.model, name, pretrained)
            r = recipe.changed({"model": model.model_dump(mode="python"), "name": f"{recipe.name}-{name}"})
            log.info("recipe %s with %s (%s)", recipe.name, name, row.init)
            run_dir = train(r, overwrite=overwrite)
            row.run_dir = str(run_dir)
            _read_run(row, run_dir, r.train.phases[-1].name if r.train.phases else "")
            meta = read_run_json(run_dir)
            cfg = replace(base, in_chans=meta["in_chans"], num_classes=len(meta["classes"]))
            speed = benchmark_backbone(name, cfg, modes=("infer",))
            row.params, row.gflops = speed.params, speed.gflops
            if speed.error:
                raise RuntimeError(f"inference timing failed: {speed.error}")
            row.infer_img_s, row.infer_mem_gib = speed.modes["infer"].img_s, speed.modes["infer"].mem_gib
        except Exception as err:  # a failed run is a row; the other backbones go on
            row.error = _error_text(err)
            log.warning("%s: %s", name, row.error)
        save()  # after every run: a sweep of long runs that is interrupted keeps the finished rows
    files = [*save(), report.plot_pareto(out / "pareto.png", header, rows)]
    return Report(header, rows, report.recipe_markdown(header, rows), files)
