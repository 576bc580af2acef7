"""Where a process runs and how it talks to the others: device, AMP, loaders, rank, world size, gather.

Training, evaluation and scoring all run through here, on one process or on several launched by
``torchrun`` (PyTorch's own launcher and ``torch.distributed``: gloo on CPUs, NCCL on CUDA; each
rank takes its device from ``LOCAL_RANK``). :func:`setup` reads torchrun's environment and opens
the process group; without it everything below is the single-process case and costs nothing.

The distributed pieces are few, and each keeps a 1-process result unchanged:

- :class:`EpochSampler` cuts every global batch of the epoch's (seed, epoch) order into one slice
  per rank, so N ranks see exactly the samples and augmentation seeds of one process.
- :func:`shard` gives each rank a contiguous, disjoint part of an evaluation split, without
  padding (``DistributedSampler`` repeats samples to even the shards out, which changes n and every
  metric); :func:`gather` puts the parts back together, in order, on rank 0.
- :func:`broadcast` sends rank 0's decisions (best checkpoint, early stopping) to every rank.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from medvision.data.transforms import flip_rot90_batch, normalize_batch
from medvision.errors import EnvironmentProblem

log = logging.getLogger("medvision")
T = TypeVar("T")


# ------------------------------------------------------------------------ device and precision

#: Blocks up to this size come from, and go back to, the malloc heap (see :func:`reuse_freed_memory`).
KEEP_FREED = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def reuse_freed_memory() -> bool:
    """Lets glibc's malloc keep freed blocks up to :data:`KEEP_FREED` for the next allocation (once a process).

    By default glibc gives every block over 32 MB (and, until it adapts, over 128 kB) its own ``mmap`` and
    returns it to the system when freed, so each forward pass of a CNN on a batch of 32 at 224 px page-faults
    its activations in again: on the 2-core machine of ``benchmarks/cpu_allocator.py``, 13-46% of the CPU time
    went to the kernel. Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` does; jemalloc and
    tcmalloc, which PyTorch's CPU tuning guide recommends, cache freed memory too) keeps that memory in the
    process: ``tf_efficientnet_lite0`` embedded 1.6-2.4x faster there and a bare training step ran 1.2-1.4x
    faster, with 2-17% more peak memory (a whole BloodMNIST epoch at 64 px: no measurable change). Linux with
    glibc only; ``MEDVISION_MALLOC=system`` leaves malloc as it is. Returns whether the thresholds were set.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MEDVISION_MALLOC", "") == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl has no mallopt thresholds)
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """``train.deterministic``: deterministic kernels only, and no cuDNN autotuning.

    With it, a rerun of the same recipe on the same machine (same thread count) gives bit-identical
    weights and metrics; seeding alone does not promise that, as cuDNN picks kernels by timing and some
    CUDA kernels add in whatever order their threads finish.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism on CUDA >= 10.2
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("train.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of ``/proc/cpuinfo`` text (its first ``flags`` line: every core of a machine has the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX-BF16 among the ``/proc/cpuinfo`` flags.

    torch's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) accepts any AVX512 core, where oneDNN
    emulates bf16 much slower than fp32; it is the answer only where there is no ``/proc/cpuinfo`` to read.
    ``cpuinfo`` is that file's text (read here when None).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def native_cuda_bf16() -> bool:
    """Whether this GPU computes bf16 natively (Ampere and later), not through the emulation torch also counts."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no such argument and counts no emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_amp(amp: str, device: torch.device, training: bool = False) -> str:
    """Turns ``auto`` into bf16 where the hardware runs it natively, else fp16 on a GPU and ``none`` on a CPU.

    Warns on emulated bf16 (a pre-Ampere GPU, a CPU without AVX512-BF16/AMX). With ``training``, fp16 off CUDA is
    refused: its GradScaler needs a CUDA device (``device: auto`` on a machine without one ends up there).

    Raises:
        EnvironmentProblem: ``training`` with fp16 on a device that is not CUDA.
    """
    if training and amp == "fp16" and device.type != "cuda":
        raise EnvironmentProblem(f"train.amp 'fp16' needs a CUDA device (it trains with a GradScaler), but the run's "
                                 f"device is {device.type!r}; use amp: bf16, none or auto")  # fmt: skip
    native_bf16 = native_cuda_bf16() if device.type == "cuda" else native_cpu_bf16()
    if amp == "auto":
        return "bf16" if native_bf16 else ("fp16" if device.type == "cuda" else "none")
    if amp == "bf16" and not native_bf16:
        log.warning("train.amp bf16: this %s has no native bf16; it is emulated and much slower than fp32", device.type)
    return amp


def autocast(device: torch.device, amp: str) -> torch.autocast:
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """``auto``: no workers on a CPU-only machine (they would compete with the model for cores)."""
    if setting != "auto":
        return int(setting)
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def reader_processes(device: torch.device) -> int:
    """How many tile-reading processes a slide stream starts by default. Beside a model on the CPU, one per thread
    of the model (at most 8): they take turns with it, reading while it waits for a batch
    (``isolated_map(turns=True)``), so the wait is shortest with every core reading. Beside a GPU, every core
    but this process's own, shared among this machine's torchrun ranks (``LOCAL_WORLD_SIZE``): one reader reads
    300-450 tiles a second, a fast encoder on an H200 embeds over 4,000 (``benchmarks/RESULTS.md``)."""
    if device.type == "cpu":
        return max(1, min(8, torch.get_num_threads()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


# ------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks; ``Dist()`` is the single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one writer of run folders, logs, checkpoints, reports and merged outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Several ranks share an open process group; with one rank every collective below is a no-op."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


SINGLE = Dist()
"""The single-process :class:`Dist`, the default of every function that takes one."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def current() -> Dist:
    """This process's :class:`Dist` (``Dist()`` until :func:`setup` opened a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device_setting: str = "auto", timeout: datetime.timedelta | None = None) -> tuple[Dist, torch.device]:
    """The device of this process, and its rank: opens the process group when torchrun launched it.

    gloo on the CPU, NCCL on CUDA, where rank ``r`` of a node takes ``cuda:LOCAL_RANK``. A second
    call (train, then evaluate, in one process) reuses the group. Sets malloc to reuse freed memory
    (:func:`reuse_freed_memory`).
    """
    reuse_freed_memory()
    device = resolve_device(device_setting)
    if not launched_by_torchrun():
        return Dist(), device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} CUDA device(s); "
                "give torchrun --nproc-per-node at most that many"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend, **kwargs)
    return current(), device


def teardown() -> None:
    """Closes the process group, if one is open (at the end of a torchrun rank's command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, d: Dist) -> range:
    """This rank's contiguous part of ``range(n)``; the parts are disjoint, cover it, differ in size by <= 1."""
    return range(n * d.rank // d.world_size, n * (d.rank + 1) // d.world_size)


def local_part(dataset: Dataset[Any], d: Dist) -> Dataset[Any]:
    """This rank's :func:`shard` of an evaluation dataset (the dataset itself on one rank)."""
    if d.world_size == 1:
        return dataset
    return Subset(dataset, list(shard(len(dataset), d)))  # type: ignore[arg-type]


def gather(obj: T, d: Dist) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); ``[obj]`` on one process."""
    if not d.enabled:
        return [obj]
    out: list[Any] | None = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: T, d: Dist) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_tensor(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """(world_size, *x.shape): every rank's ``x``, on every rank."""
    if not d.enabled:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x)
    return torch.stack(parts)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, before evaluation or saving.

    DDP broadcasts them at the start of each training forward, after which each rank's own batch
    moves them a little; evaluating with those would give each shard a slightly different model.
    """
    if d.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def wrap_ddp(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around the parameters that train now (built per freeze phase)."""
    if not d.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # buffers follow rank 0 each forward


# ---------------------------------------------------------------------------------- loaders


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles by (seed, epoch) and gives each sample its own augmentation seed: ``(index, seed)`` keys.

    The order and every sample's augmentation depend only on (seed, epoch, position), never on the
    worker that loads it, so workers can persist across epochs and a resumed run still sees
    exactly the data an uninterrupted one would.

    With ``world_size`` ranks and the global ``batch_size``, each global batch of that order is cut
    into one contiguous slice per rank, so the ranks together see exactly the batches of one process.
    A last batch too small to give every rank ``min_per_rank`` samples is dropped: DDP needs every rank to step,
    and a BatchNorm that trains cannot on one sample (give 2 then; timm's train script drops every last batch
    for the same reason). One process keeps such a batch only where it is the whole epoch.

    ``drop_last`` leaves out the epoch's last partial batch (self-supervised pretraining).

    With ``weights`` (``train.balance: sampler``), each epoch draws its ``n`` samples with replacement
    in proportion to them, from the same (seed, epoch) generator, so it stays deterministic and resumable.

    With ``groups`` and ``per_group`` (whole-slide tiles and ``data.tiles_per_slide``), each epoch
    takes at most ``per_group`` samples of every group, a new seeded draw each epoch, so that the
    epoch length is fixed and a big slide does not dominate.
    """

    def __init__(
        self, n: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1,
        groups: list[str] | None = None, per_group: int | None = None, weights: np.ndarray | None = None,
        drop_last: bool = False, min_per_rank: int = 1,
    ) -> None:  # fmt: skip
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        if weights is not None and len(weights) != n:
            raise ValueError(f"EpochSampler: {len(weights)} weights for {n} samples")
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        self.epoch = 0
        self.pool = n
        self.codes: np.ndarray | None = None
        self.per_group = per_group
        if per_group is not None and groups is not None:
            if len(groups) != n:
                raise ValueError(f"EpochSampler: {len(groups)} groups for {n} samples")
            _, codes = np.unique(np.asarray(groups), return_inverse=True)
            self.codes = codes.astype(np.int64)
            n = int(np.minimum(np.bincount(self.codes), per_group).sum())
        if drop_last and n >= batch_size:  # every step a full global batch (BatchNorm'd projection heads need > 1)
            n -= n % batch_size
        self.n = n
        tail = n % batch_size
        must = world_size > 1 and 0 < tail < world_size  # some rank would get nothing
        self.used = n - tail if must or (0 < tail < min_per_rank * world_size and n > tail) else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:  # class-balanced: n draws with replacement, each class equally likely
            order = torch.multinomial(self.weights, self.pool, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.pool, generator=g).tolist()
        if self.codes is not None and self.per_group is not None:
            # the first ``per_group`` of each group in this epoch's shuffled order: a fresh draw every epoch
            taken = np.zeros(int(self.codes.max()) + 1, np.int64)
            picked = []
            for i in order:
                c = self.codes[i]
                if taken[c] < self.per_group:
                    taken[c] += 1
                    picked.append(i)
            order = picked
        order = order[: self.n]
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        return list(zip(order, seeds, strict=True))

    def global_batch_sizes(self) -> list[int]:
        """Samples in each global (all-rank) batch of an epoch, in step order."""
        return [min(self.batch_size, self.used - s) for s in range(0, self.used, self.batch_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = self._order()
        if self.world_size == 1:
            return iter(keys[: self.used])
        mine: list[tuple[int, int]] = []
        for start, m in zip(range(0, self.used, self.batch_size), self.global_batch_sizes(), strict=True):
            lo, hi = m * self.rank // self.world_size, m * (self.rank + 1) // self.world_size
            mine.extend(keys[start + lo : start + hi])
        return iter(mine)

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.used
        return sum(m * (self.rank + 1) // self.world_size - m * self.rank // self.world_size
                   for m in self.global_batch_sizes())  # fmt: skip


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler[tuple[int, int]] | None = None,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Workers persist across epochs and prefetch; batches are pinned for ``non_blocking`` copies to CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


@dataclass(frozen=True)
class Inputs:
    """How a loader batch becomes model input on the device: copy (compact dtype), flips, normalise, layout."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool
    flips: bool = False
    """Random per-image flips/rot90 on the device (``augment.on_device``); training batches only."""

    def __call__(self, x: torch.Tensor, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if self.flips and generator is not None:
            x = flip_rot90_batch(x, generator)
        x = normalize_batch(x, self.mean, self.std)
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def to_device(
    x: torch.Tensor, device: torch.device, inputs: Inputs | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A loader batch as model input: through ``inputs`` (compact dtype -> normalised), or as it is."""
    return inputs(x, device, generator) if inputs is not None else x.to(device, non_blocking=True)
