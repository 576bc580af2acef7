"""torchrun/DDP on the CPU (gloo, 2 processes): training equals 1 process, exact sharded evaluation,
kill + resume bit for bit, a NaN on one rank stops both, and sharded scoring merges to the 1-process output."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import read_rows, tiny_recipe
from safetensors.torch import load_file
from torch import nn

from medvision.data.sources import load_table
from medvision.data.table import FileLoader, subset_indices
from medvision.inference import load_run, split_outputs
from medvision.recipe import TrainConfig, recipe_from_dict
from medvision.runs import cache_dir
from medvision.runtime import Dist, EpochSampler, shard
from medvision.tasks.demo import make_dataset
from medvision.tasks.evaluate import evaluate_run
from medvision.tasks.score import score_folder
from medvision.tasks.train import train
from medvision.training.loop import NonFiniteLoss, train_one_epoch
from medvision.training.setup import warmup_cosine

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


@pytest.mark.parametrize(
    "n,batch,world,least",
    [
        (42, 16, 2, 1),
        (43, 16, 2, 1),
        (33, 16, 2, 1),
        (40, 12, 3, 1),
        (17, 16, 2, 1),
        (35, 16, 2, 2),
        (40, 12, 3, 2),
        (17, 16, 1, 2),
    ],
)
def test_epoch_sampler_ranks_see_the_batches_of_one_process(n: int, batch: int, world: int, least: int) -> None:
    """``least``: samples a rank must get (2 where a BatchNorm trains: it cannot on one)."""
    one = EpochSampler(n, seed=3, batch_size=batch, min_per_rank=least)
    one.set_epoch(2)
    ranks = [EpochSampler(n, seed=3, batch_size=batch, rank=r, world_size=world, min_per_rank=least)
             for r in range(world)]  # fmt: skip
    for s in ranks:
        s.set_epoch(2)
    keys = list(one)  # (index, augmentation seed) in step order
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [len(s) for s in ranks]
    tail = n % batch
    used = n - tail if 0 < tail < least * world else n  # a last batch that gives a rank too few is dropped
    sizes = ranks[0].global_batch_sizes()
    assert sum(sizes) == used and all(s >= least * world for s in sizes)
    per_rank = batch // world
    steps = [[p[i : i + per_rank] for i in range(0, len(p), per_rank)] for p in parts]  # as the DataLoader cuts them
    assert len({len(s) for s in steps}) == 1  # every rank takes the same number of steps
    start = 0
    for step, size in enumerate(sizes):
        assert [k for rank in steps for k in rank[step]] == keys[start : start + size]  # same samples, same seeds
        start += size


def test_shards_are_contiguous_disjoint_and_unpadded() -> None:
    for n, world in ((21, 2), (5, 4), (3, 4), (0, 2)):
        parts = [shard(n, Dist(r, world)) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))  # no sample twice, none left out, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nan_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's second batch is NaN; both ranks must stop with the same message, neither may hang."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    x = torch.randn(4, 4, 4)
    if rank == 1:
        x[1] = float("nan")
    batches = [(x[i], torch.tensor([0, 1, 0, 1])) for i in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(4, 0.0))
    cfg = TrainConfig(phases=[{"name": "p", "epochs": 1, "trainable": "all", "lr": 1e-3}], log_interval=1)
    d = Dist(rank, world)
    try:
        train_one_epoch(model, batches, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), cfg,  # type: ignore[arg-type]
                        torch.device("cpu"), "train", "p 1/1", d=d, global_sizes=[8] * 4)  # fmt: skip
        Path(out, f"rank{rank}").write_text("no error")
    except NonFiniteLoss as err:
        Path(out, f"rank{rank}").write_text(str(err))
    dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank_with_the_message(tmp_path: Path) -> None:
    ctx = mp.start_processes(_nan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "a rank hung after the NaN"
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}").read_text()
        assert "loss became nan between steps 2 and 2 on rank(s) 1 of 2" in text, (rank, text)


def _medvision(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medvision", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "medvision"]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """torchrun itself (``--nproc`` is tested once, in ``two_rank_run``; this saves the launcher's imports)."""
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A recipe on 84 tiles (train 42, val 21, test 21: odd shards) with BN frozen, so no batch statistics."""
    root = tmp_path_factory.mktemp("ddp")
    manifest = make_dataset(root / "data", patients=12, tiles_per_patient=7, seed=1)
    tree = tiny_recipe(manifest, root / "runs")
    tree["train"]["phases"] = [
        {"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2, "bn": "frozen"},
        {"name": "full", "epochs": 3, "trainable": "all", "lr": 3e-3, "bn": "frozen"},
    ]
    tree["evaluation"] = {"bootstrap": 50, "explain": 0}
    (root / "r.yaml").write_text(yaml.safe_dump(tree))
    return root, root / "r.yaml"


@pytest.fixture(scope="module")
def two_rank_run(ddp_setup: tuple[Path, Path]) -> Path:
    root, recipe = ddp_setup
    proc = _medvision("train", str(recipe), "--set", "name=two", "--nproc", "2", "--track", "--set",
                      "tracking.tensorboard=true", "--set", "tracking.log_model=false", cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # one rank prints
    return root / "runs" / "two"


def test_two_ranks_train_like_one_process(ddp_setup: tuple[Path, Path], two_rank_run: Path) -> None:
    _, recipe = ddp_setup
    log = (two_rank_run / "train.log").read_text()
    assert "distributed: 2 ranks (gloo), global batch 16 = 8 per rank" in log
    assert log.count("phase full:") == 1  # one writer: rank 0
    one = train(recipe_from_dict({**yaml.safe_load(recipe.read_text()), "name": "one"}))
    a, b = load_file(one / "model.safetensors"), load_file(two_rank_run / "model.safetensors")
    # Same samples, augmentations and (BN frozen) the same gradient of the global batch's mean loss: only the
    # order of float32 additions differs (per-rank sums, then the all-reduce), about 1 eps (1.2e-7) relative per
    # step. AdamW divides by sqrt(v), which magnifies such differences where a gradient is near 0. Measured after
    # 9 steps: 2e-7 relative (L2 over all weights), 1.5e-5 at most in one coordinate. The bounds keep a 50x margin;
    # one wrong sample or a misplaced batch boundary moves the weights by orders of magnitude more.
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    rel = float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5
                / sum((a[k].float() ** 2).sum() for k in a) ** 0.5)  # fmt: skip
    assert rel < 1e-5 and diff < 1e-3, (rel, diff)
    history = [json.loads((r / "metrics.json").read_text())["history"] for r in (one, two_rank_run)]
    assert [h["epoch"] for h in history[0]] == [h["epoch"] for h in history[1]]
    np.testing.assert_allclose([h["train_loss"] for h in history[0]], [h["train_loss"] for h in history[1]],
                               rtol=1e-5)  # fmt: skip


def test_only_rank_0_tracks(ddp_setup: tuple[Path, Path], two_rank_run: Path) -> None:
    """``--nproc 2 --track``: one MLflow run whose every epoch is logged once, and one TensorBoard file."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    root, _ = ddp_setup
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medvision").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "two"
    epochs = [h["epoch"] for h in json.loads((two_rank_run / "metrics.json").read_text())["history"]]
    logged = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in logged) == epochs  # once each, not once a rank
    assert len(list((two_rank_run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_sharded_evaluation_equals_one_process(ddp_setup: tuple[Path, Path], two_rank_run: Path) -> None:
    root, _ = ddp_setup
    two = json.loads((two_rank_run / "metrics.json").read_text())  # val and test sharded over 2 ranks
    out, _ = evaluate_run(two_rank_run, out=root / "eval-one")  # the same checkpoint, one process
    one = json.loads((out / "metrics.json").read_text())
    assert two["image"]["test"]["n"] == one["image"]["test"]["n"] == 21  # odd: 11 + 10, nothing repeated
    for key in ("auc", "acc", "balanced_acc", "average_precision"):
        assert abs(two["image"]["test"][key] - one["image"]["test"][key]) <= 1e-6, key
    proc = _torchrun("evaluate", str(two_rank_run), "--out", str(root / "eval-two"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((root / "eval-two" / "metrics.json").read_text())
    assert sharded["world_size"] == 2
    for level in ("image", "patient"):
        a, b = sharded[level]["test"], one[level]["test"]
        assert a["n"] == b["n"] and abs(a["auc"] - b["auc"]) <= 1e-6 and a["auc_ci"] == b["auc_ci"]
        assert a["operating_points"] == b["operating_points"]
        # logits differ by float noise (a shard's batches have other sizes, so other kernel blockings)
        for key, value in b["calibration"].items():
            assert abs(a["calibration"][key] - value) <= 1e-6, key
    assert two["image"]["test"]["auc_ci"] == one["image"]["test"]["auc_ci"]


def test_with_ema_and_batchnorm_training_the_ranks_validate_the_model_they_save(ddp_setup: tuple[Path, Path]) -> None:
    """The average's BatchNorm statistics follow each rank's own; validated unsynced, the epoch's val_loss (which
    picks the checkpoint) was of no model the run saved (val AUC 0.6406 in the history, 0.6250 saved)."""
    root, recipe_path = ddp_setup
    tree = yaml.safe_load(recipe_path.read_text())
    tree["train"].update(ema=0.5, monitor="val_loss")
    tree["train"]["phases"] = [{"name": "full", "epochs": 1, "trainable": "all", "lr": 3e-3, "bn": "train"}]
    tree["data"]["batch_size"] = 14
    path = root / "ema.yaml"
    path.write_text(yaml.safe_dump(tree))
    proc = _torchrun("train", str(path), "--set", "name=ema2", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "runs" / "ema2"
    (epoch,) = json.loads((run / "metrics.json").read_text())["history"]
    recipe, _, bundle = load_run(run, torch.device("cpu"))
    got = split_outputs(bundle, recipe, load_table(recipe.data, recipe.seed, cache_dir(recipe)), "val",
                        torch.device("cpu"), 0)  # fmt: skip
    assert got is not None
    assert got[2] == pytest.approx(epoch["val_loss"], rel=1e-5)  # the saved model, one process, float32


def _last_epoch(run: Path) -> int:
    try:
        return int(torch.load(run / "last.pt", weights_only=True)["fit"]["epoch"])
    except Exception:  # not written yet, or being replaced
        return 0


@pytest.mark.slow
def test_killed_two_rank_run_resumes_bit_for_bit(ddp_setup: tuple[Path, Path], two_rank_run: Path) -> None:
    root, recipe = ddp_setup
    cmd = [*TORCHRUN, "train", str(recipe), "--set", "name=killed"]
    proc = subprocess.Popen(cmd, cwd=root, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    killed = root / "runs" / "killed"
    deadline = time.monotonic() + 120
    while _last_epoch(killed) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, like kill -9 of the job
    proc.wait()
    assert 2 <= _last_epoch(killed) < 4, "the kill did not land inside the run"
    resumed = _torchrun("train", "--resume", str(killed), cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (killed / "train.log").read_text()
    a = torch.load(killed / "last.pt", weights_only=True)["model"]
    b = torch.load(two_rank_run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)  # bit for bit, on the CPU


@pytest.mark.slow
def test_two_rank_scoring_merges_to_the_one_process_output(ddp_setup: tuple[Path, Path], two_rank_run: Path) -> None:
    root, _ = ddp_setup
    folder = root / "data"
    (folder / "tiles" / "empty.png").write_bytes(b"")
    one = root / "one.csv"
    assert score_folder(folder, two_rank_run, one, workers=0).exit_code == 3  # the empty PNG is an error row
    two = root / "two.csv"
    argv = ["score", str(folder), "--model", str(two_rank_run), "--out", str(two), "--workers", "0"]
    proc = _torchrun(*argv, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]  # under torchrun every rank exits 0 ...
    assert "exit code 3 (recorded in" in proc.stdout  # ... and the code is in the sidecar
    assert two.read_text() == one.read_text()  # the same rows, in the same order: no duplicates, no losses
    record = json.loads(Path(f"{two}.json").read_text())
    assert record["world_size"] == 2 and record["reconciled"] and record["exit_code"] == 3
    assert record["files_found"] == 86  # 84 tiles, the manifest (skipped) and the empty PNG (error)
    parts = sorted((root / "two.csv.parts").iterdir())
    assert [p.name for p in parts] == ["rank0-of-2.csv", "rank1-of-2.csv"]
    sizes = [len(read_rows(p)) for p in parts]
    assert sum(sizes) == len(read_rows(one)) and min(sizes) > 0
    # what a kill leaves: one part cut mid-row, no merged output; the re-run resumes that part only
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    two.unlink()
    proc = _torchrun(*argv, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_text() == one.read_text()
    resumed = json.loads(Path(f"{two}.json").read_text())
    assert sizes[0] < resumed["already_done"] < sum(sizes)  # rank 0 kept its part, rank 1 half of its


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.slow
def test_a_bad_file_on_one_rank_stops_both_with_its_error(ddp_setup: tuple[Path, Path], tmp_path: Path) -> None:
    root, recipe_path = ddp_setup
    tree = yaml.safe_load(recipe_path.read_text())
    recipe = recipe_from_dict({**tree, "name": "bad"})
    table = load_table(recipe.data, recipe.seed, tmp_path)
    train_idx = subset_indices(table, "train", None, recipe.seed)
    sampler = EpochSampler(len(train_idx), recipe.seed, recipe.data.batch_size, rank=1, world_size=2)
    position = list(sampler)[2][0]  # the third sample rank 1 reads in epoch 1; never the split's first (probed)
    assert isinstance(table.loader, FileLoader) and position != 0
    bad = Path(table.loader.paths[int(train_idx[position])])
    good = bad.read_bytes()
    # pixel data that only decoding finds broken: whole chunks with valid checksums, so the data audit (which
    # checks headers and stops a run on a PNG cut short before any rank trains) lets it through
    bad.write_bytes(good[:33] + _png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64) + _png_chunk(b"IEND", b""))
    try:
        start = time.monotonic()
        proc = _torchrun("train", str(recipe_path), "--set", "name=bad", cwd=root)
        assert time.monotonic() - start < 120  # no rank waits forever for the one that failed
    finally:
        bad.write_bytes(good)
    assert proc.returncode != 0
    assert f"medvision train: error: {bad}" in proc.stderr  # the real error, with the file's name
    # torchrun stopped the other rank (which may report the closed connection first) and says it failed
    assert "medvision FAILED" in proc.stderr and "Root Cause" in proc.stderr


def test_global_batch_must_divide_by_the_world_and_sync_bn_needs_gpus(
    ddp_setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import medvision.tasks.train as run

    _, recipe_path = ddp_setup
    tree = yaml.safe_load(recipe_path.read_text())
    monkeypatch.setattr(run, "setup", lambda device: (Dist(0, 3), torch.device("cpu")))  # rank 0 of 3, no group
    with pytest.raises(run.RunError, match=r"data\.batch_size 16 is the global batch and must divide by the world "
                                           r"size 3; use a multiple of 3, e\.g\. 15"):  # fmt: skip
        train(recipe_from_dict({**tree, "name": "three"}))
    monkeypatch.setattr(run, "setup", lambda device: (Dist(0, 2), torch.device("cpu")))
    with pytest.raises(
        run.RunError,
        match=r"train\.mixup / train\.cutmix on 2 ranks: each rank's slice of a batch "
        r"\(data\.batch_size 6 / 2 = 3\) must be even.*use data\.batch_size 8",
    ):
        train(recipe_from_dict(json.loads(json.dumps({**tree, "name": "mix3"})),
                               overrides=["train.mixup=0.8", "data.batch_size=6"]))  # fmt: skip
    with pytest.raises(run.RunError, match=r"1 training image\(s\) on 2 ranks: not one training step"):
        train(recipe_from_dict(json.loads(json.dumps({**tree, "name": "one_image"})),
                               overrides=["data.limit=1", "data.batch_size=2"]))  # fmt: skip
    tree["train"]["sync_bn"] = True
    with pytest.raises(run.RunError, match="SyncBatchNorm runs on GPUs only"):
        train(recipe_from_dict({**tree, "name": "syncbn"}))


@pytest.mark.slow
def test_early_stopping_is_decided_once_for_every_rank(ddp_setup: tuple[Path, Path]) -> None:
    root, recipe_path = ddp_setup
    tree = yaml.safe_load(recipe_path.read_text())
    tree["train"].update(patience=1, monitor="val_loss")
    tree["train"]["phases"][1]["epochs"] = 6
    path = root / "patience.yaml"
    path.write_text(yaml.safe_dump(tree))
    proc = _torchrun("train", str(path), "--set", "name=patience2", cwd=root)  # a rank left training would hang
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((root / "runs" / "patience2" / "metrics.json").read_text())["history"]
    one = json.loads((train(recipe_from_dict({**tree, "name": "patience1"})) / "metrics.json").read_text())["history"]
    assert len(two) == len(one) < 7  # stopped early, after the same epoch as one process
    assert (
        "early stopping: val_loss did not improve for 1 epochs"
        in (root / "runs" / "patience2" / "train.log").read_text()
    )
