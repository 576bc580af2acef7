"""``medvision benchmark``: the pure helpers, FLOP counting against hand-counted layers, speed mode and
recipe mode end to end on tiny timm models at 32 px (CPU, seconds)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_recipe
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medvision.cli import main
from medvision.recipe import ModelConfig
from medvision.tasks.benchmark.report import Spread, pareto_front, summarize
from medvision.tasks.benchmark.speed import (
    BenchmarkError,
    check_backbone,
    count_flops,
    parse_backbones,
    speed_config,
    starting_weights,
    time_steps,
)

TINY = ["test_resnet", "test_efficientnet"]
FAST = ["--image-size", "32", "--batch-size", "4", "--warmup", "1", "--repeats", "2", "--steps", "1"]


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


# ------------------------------------------------------------------------------------ pure helpers


def test_summarize_reports_median_and_range_and_inverts_to_rates() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Spread(median=2.0, min=1.0, max=3.0)
    assert summarize([0.1, 0.3]).median == pytest.approx(0.2)
    # seconds per step -> images per second for a batch of 8: the slowest step gives the lowest rate
    assert summarize([0.5, 1.0, 2.0]).inverse(8) == Spread(median=8.0, min=4.0, max=16.0)
    for bad in ([], [1.0, math.nan]):
        with pytest.raises(ValueError, match="finite sample"):
            summarize(bad)


def test_pareto_front_keeps_only_undominated_points() -> None:
    #          fast+bad  balanced  slow+best  dominated  failed
    xs = [1000.0, 500.0, 100.0, 400.0, math.nan]
    ys = [0.80, 0.90, 0.95, 0.85, 0.99]
    assert pareto_front(xs, ys) == [2, 1, 0]  # sorted by throughput
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [0, 1]  # ties: neither beats the other
    assert pareto_front([1.0, 1.0], [0.5, 0.6]) == [1]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="one y per x"):
        pareto_front([1.0], [])


def test_backbone_names_are_parsed_and_unknown_ones_get_suggestions() -> None:
    assert parse_backbones(" resnet18, ,efficientnet_b0,resnet18") == ["resnet18", "efficientnet_b0"]
    with pytest.raises(BenchmarkError, match="names no model"):
        parse_backbones(" , ")
    check_backbone("resnet18.a1_in1k")  # a pretrained tag is fine
    with pytest.raises(BenchmarkError, match="'resnet_18' is not a timm model; did you mean resnet18"):
        check_backbone("resnet_18")


def test_speed_config_uses_small_cpu_defaults_and_rejects_bad_values() -> None:
    cfg = speed_config("cpu", "none")
    assert (cfg.device.type, cfg.image_size, cfg.batch_size, cfg.amp) == ("cpu", 64, 32, "none")
    assert speed_config("cpu", "none", image_size=None, batch_size=8).batch_size == 8  # None: the default
    with pytest.raises(BenchmarkError, match="fp16' needs a CUDA device"):
        speed_config("cpu", "fp16")
    with pytest.raises(BenchmarkError, match="batch_size is 0; expected at least 1"):
        speed_config("cpu", "none", batch_size=0)
    with pytest.raises(BenchmarkError, match="unknown speed option"):
        speed_config("cpu", "none", batchsize=8)
    if not torch.cuda.is_available():
        with pytest.raises(BenchmarkError, match="sees no CUDA device"):
            speed_config("cuda")


def test_time_steps_excludes_warmup_and_times_every_repeat() -> None:
    calls = []
    timing = time_steps(lambda: calls.append(1), torch.device("cpu"), warmup=3, repeats=4, steps=5)
    assert len(calls) == 3 + 4 * 5 and len(timing.per_step_s) == 4
    assert timing.first_s >= 0 and all(t >= 0 for t in timing.per_step_s)


def test_count_flops_matches_a_hand_count() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    conv, depthwise, linear = 2 * 3 * 8 * 9 * 8 * 8, 2 * 8 * 9 * 8 * 8, 2 * 8 * 10  # a multiply-add is 2 FLOPs
    assert count_flops(model, 8, 3) == conv + depthwise + linear
    assert model.training  # the caller's mode is restored


def test_flop_counter_overcounts_grouped_conv_backward_so_train_flops_use_3x_forward() -> None:
    """Why training FLOPs are 3x the forward: torch's counted backward ignores conv groups (torch 2.x)."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    forward = 2 * 8 * 9 * 16 * 16
    true_backward = 2 * forward  # input and weight gradients, each as costly as the forward
    if counter.get_total_flops() == forward + true_backward:
        pytest.skip("this torch counts grouped conv backward correctly; counting it would now be an option")
    assert counter.get_total_flops() > forward + true_backward


def test_starting_weights_follow_the_policy() -> None:
    own = ModelConfig(name="tf_efficientnet_lite0", pretrained="/w/tf_efficientnet_lite0.safetensors", drop_rate=0.2)
    kept, label = starting_weights(own, "tf_efficientnet_lite0", "auto")
    assert kept.pretrained == own.pretrained and label == "file tf_efficientnet_lite0.safetensors"
    other, label = starting_weights(own, "resnet18", "auto")  # that file cannot fit a resnet
    assert (other.name, other.pretrained, other.drop_rate, label) == ("resnet18", False, 0.2, "random init")
    hub = ModelConfig(name="resnet18", pretrained=True)
    assert starting_weights(hub, "convnext_tiny", "auto")[0].pretrained is True  # the hub fits every backbone
    assert starting_weights(own, "resnet18", "hub") == (ModelConfig(name="resnet18", pretrained=True, drop_rate=0.2),
                                                        "timm hub")  # fmt: skip
    assert starting_weights(hub, "resnet18", "none")[1] == "random init"
    with pytest.raises(BenchmarkError, match="expected one of"):
        starting_weights(own, "resnet18", "imagenet")


# ------------------------------------------------------------------------------------ speed mode


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("speed")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["benchmark", "speed", "--backbones", "test_resnet,resnet_18,test_efficientnet", "--device", "cpu",
                     "--amp", "none", "--peak-size", "256", "--out", str(out), *FAST])  # fmt: skip
    return code, out, printed.getvalue()


def test_speed_writes_csv_table_and_plot_with_real_measurements(speed_run: tuple[int, Path, str]) -> None:
    code, out, printed = speed_run
    assert code == 0
    rows = _rows(out / "speed.csv")
    assert [r["backbone"] for r in rows] == ["test_resnet", "resnet_18", "test_efficientnet"]
    for r in (rows[0], rows[2]):
        assert r["error"] == "" and r["device"] == "cpu" and r["device_name"].startswith("CPU:")
        assert (r["amp"], r["image_size"], r["batch_size"]) == ("none", "32", "4")
        model = timm.create_model(r["backbone"], num_classes=1000).eval()
        assert int(r["params"]) == sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert float(r["gflops"]) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6) and float(r["gflops"]) > 0
        assert float(r["train_gflops"]) == pytest.approx(3 * float(r["gflops"]))
        for mode in ("train", "infer"):
            lo, med, hi = (float(r[f"{mode}_img_s{s}"]) for s in ("_min", "", "_max"))
            assert 0 < lo <= med <= hi
            assert float(r[f"{mode}_step_ms"]) * med == pytest.approx(4 * 1000)  # batch 4 per step
            gflops = float(r["train_gflops" if mode == "train" else "gflops"])
            assert float(r[f"{mode}_tflops"]) == pytest.approx(gflops * med / 1e3)
            # against the run's own measured peak (a 256 px matmul on a busy 2-core machine can measure below a
            # tiny model's rate, so no upper bound: the ratio itself is checked)
            mfu = float(r[f"{mode}_mfu"])
            assert mfu > 0 and mfu == pytest.approx(float(r[f"{mode}_tflops"]) / float(r["peak_tflops"]), rel=1e-3)
            assert r[f"{mode}_mem_gib"] == ""  # not measured on a CPU, rather than a wrong number
        assert float(r["peak_tflops_min"]) <= float(r["peak_tflops"]) <= float(r["peak_tflops_max"])
    bad = rows[1]
    assert bad["params"] == "" and bad["infer_img_s"] == "" and "did you mean resnet18" in bad["error"]
    md = (out / "speed.md").read_text()
    assert md in printed and "- device: **cpu**, CPU:" in md and "| backbone | params (M) | GFLOPs/img |" in md
    assert "not measured on a CPU" in md and "multiply-add is 2 FLOPs" in md
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_speed_table_gives_small_rates_in_significant_figures(speed_run: tuple[int, Path, str]) -> None:
    """A 32 px test model's GFLOPs and TFLOP/s on a CPU are thousandths: ``0.00412``, never ``0.000`` or ``0.004``."""
    _, out, _ = speed_run
    record = _rows(out / "speed.csv")[0]
    line = next(x for x in (out / "speed.md").read_text().splitlines() if x.startswith("| test_resnet |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(record["gflops"]) < 0.1 and cells[2] == f"{float(record['gflops']):.3g}"
    assert cells[5] == f"{float(record['train_tflops']):.3g}" and cells[6] == f"{float(record['train_mfu']):.3g}"
    assert cells[10] == f"{float(record['infer_tflops']):.3g}" and "0.000" not in cells


def test_demo_amp_help_says_what_auto_resolves_to(capsys: pytest.CaptureFixture[str]) -> None:
    """``auto`` is :func:`medvision.runtime.resolve_amp`'s: fp16 on a CUDA GPU without bf16, not fp32."""
    from medvision.runtime import resolve_amp

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fp16 on a CUDA GPU without bf16" in text and "bf16 where the device runs it natively" in text
    assert resolve_amp("auto", torch.device("cpu")) in ("bf16", "none")  # the CPU half of the same rule


def test_speed_cli_exits_nonzero_when_nothing_runs_and_names_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--device", "cpu", "--amp", "none", "--peak-size", "64", "--out", str(tmp_path), *FAST]
    assert main(["benchmark", "speed", "--backbones", "no_such_net", *args]) == 1
    assert "no backbone could be measured" in capsys.readouterr().err
    assert (tmp_path / "speed.png").is_file()  # the figure says why it is empty
    assert main(["benchmark", "speed", "--backbones", "test_resnet", "--device", "cpu", "--amp", "fp16"]) == 2
    assert "medvision benchmark: error: amp 'fp16' needs a CUDA device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ recipe mode


def test_recipe_mode_trains_each_backbone_and_draws_the_pareto_plot(
    tiles_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path / "runs", phases=[{"name": "full", "epochs": 1, "lr": 3e-3}])
    tree["evaluation"]["explain"] = 0
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tree))
    out = tmp_path / "bench"
    backbones = "test_efficientnet,not_a_net,test_resnet"
    code = main(["benchmark", "recipe", str(tmp_path / "tiny.yaml"), "--backbones", backbones, "--out", str(out),
                 "--set", "data.eval_batch_size=8", "--warmup", "1", "--repeats", "2", "--steps", "1"])  # fmt: skip
    assert code == 0
    rows = _rows(out / "recipe.csv")
    assert [r["backbone"] for r in rows] == ["test_efficientnet", "not_a_net", "test_resnet"]
    for r in (rows[0], rows[2]):
        assert r["error"] == "" and r["init"] == "random init" and r["device"] == "cpu"
        run = Path(r["run_dir"])
        assert run.name == f"tiny-{r['backbone']}" and (run / "metrics.json").is_file()
        assert 0 <= float(r["test_auc"]) <= 1 and 0 <= float(r["test_acc"]) <= 1
        assert float(r["test_auc_lo"]) <= float(r["test_auc"]) <= float(r["test_auc_hi"])  # bootstrap CI, 50 resamples
        assert float(r["train_img_s"]) > 0 and 0 < float(r["infer_img_s_min"]) <= float(r["infer_img_s"])
        model = timm.create_model(r["backbone"], num_classes=2)
        assert int(r["params"]) == sum(p.numel() for p in model.parameters())  # measured with the run's 2 classes
    assert "'not_a_net' is not a timm model" in rows[1]["error"] and rows[1]["test_auc"] == ""
    md = (out / "recipe.md").read_text()
    assert "# Recipe benchmark: tiny" in md and "| test_resnet | random init |" in md
    assert md in capsys.readouterr().out
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
