"""One error root: every failure a user can cause is one line on stderr naming the file or key, exit 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import medvision.cli as cli
import medvision.tasks.evaluate as evaluate_task
from medvision.errors import EnvironmentProblem, ExportError, MedvisionError
from medvision.recipe import RecipeError
from medvision.runs import RunError, read_run_json


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_every_user_error_derives_from_the_root() -> None:
    from medvision.data.table import DataSourceError
    from medvision.gradcam import ExplainError
    from medvision.io.dicom import DicomReadError
    from medvision.models.backbone import PretrainedUnavailable
    from medvision.models.freeze import FreezeError
    from medvision.tasks.benchmark.speed import BenchmarkError
    from medvision.training.loop import NonFiniteLoss
    from medvision.wsi.slide import SlideError

    for kind in (RecipeError, DataSourceError, RunError, ExportError, EnvironmentProblem, ExplainError, DicomReadError,
                 PretrainedUnavailable, FreezeError, BenchmarkError, NonFiniteLoss, SlideError):  # fmt: skip
        assert issubclass(kind, MedvisionError), kind


def test_a_damaged_run_folder_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    tree = {"name": "x", "data": {"source": "npz", "path": "x.npz"}, "model": {"name": "resnet18"},
            "train": {"phases": [{"epochs": 1, "lr": 1e-3}]}}  # fmt: skip
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    (run / "model.safetensors").write_bytes(b"")
    (run / "run.json").write_text('{"classes": ["a", "b"], "in_chans": 3}')
    with pytest.raises(RunError, match=r"run\.json: missing mean, std"):
        read_run_json(run)
    (run / "run.json").write_text("{not json")
    assert cli.main(["evaluate", str(run)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("medvision evaluate: error: ") and str(run / "run.json") in line


def test_a_recipe_with_several_problems_is_still_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {source: npz, path: x.npz, batchsize: 4}\nmodel: {name: resnet18}\nmodle: {}\n")
    assert cli.main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys)
    assert "data.batchsize: unknown key" in line and "modle" in line


def test_seeds_that_are_not_numbers_and_an_out_that_is_a_folder_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "bloodmnist_effnet_lite0.yaml"
    assert cli.main(["benchmark", "medmnist", str(recipe), "--seeds", "a,b"]) == 2
    assert "--seeds 'a,b': expected whole numbers" in _one_error_line(capsys)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    args = ["score", str(tmp_path / "in"), "--model", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--workers", "0"]) == 2
    assert "is a folder; expected the table's file" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "expected a whole number >= 1"),
        ("--max-tiles", "0", "expected a whole number >= 1"),
        ("--tile-size", "0", "expected a whole number >= 1"),
        ("--target-mpp", "0", "expected a number > 0"),
        ("--target-mpp", "nan", "expected a number > 0"),
        ("--mpp", "-1", "expected a number > 0"),
        ("--min-tissue", "2", "expected a number from 0 to 1"),
        ("--slide-timeout", "-1", "expected a number > 0"),
        ("--workers", "-1", "expected a whole number >= 0"),
    ],
)
def test_features_refuses_values_out_of_range_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, expected: str
) -> None:
    """An auditor's --batch-size 0 was an 'internal error (a bug in medvision)', --min-tissue 2 a pydantic dump,
    --slide-timeout -1 made error rows that resume then kept, and --tile-size 0 was silently the encoder's size."""
    args = ["features", str(tmp_path), "--encoder", "timm:resnet18", "--out", str(tmp_path / "f"), flag, value]
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r}: {expected}" in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()


def test_a_bug_is_one_line_too_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("decision")

    monkeypatch.setattr(evaluate_task, "evaluate_run", broken)  # the CLI imports it once the command is understood
    monkeypatch.delenv("MEDVISION_DEBUG", raising=False)
    assert cli.main(["evaluate", str(tmp_path)]) == 1
    line = _one_error_line(capsys)
    assert "internal error: KeyError: 'decision'" in line and "MEDVISION_DEBUG=1" in line
    monkeypatch.setenv("MEDVISION_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["evaluate", str(tmp_path)])


def test_score_gives_a_slide_the_slide_timeout_and_a_file_the_file_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slide run was scored under the 300 s file limit (``features`` allows a slide 600 s): a slide that takes
    longer to open and find its tissue became an error row in score and not in features."""
    import medvision.tasks.score as score_task
    from medvision.options import FILE_TIMEOUT, SLIDE_TIMEOUT

    limits: dict[str, list[float]] = {"slides": [], "files": []}

    def seen(kind: str, at: int) -> Callable[..., None]:
        def stop(*args: Any, **kwargs: Any) -> None:
            limits[kind].append(args[at])
            raise RunError("stopped here: only the limit is looked at")

        return stop

    monkeypatch.setattr(score_task, "score_slides", seen("slides", 7))
    monkeypatch.setattr(score_task, "score_folder", seen("files", 8))
    for name, source in (("slide_run", "slides"), ("file_run", "folder")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump({"data": {"source": source}}))
    for run in ("slide_run", "file_run"):
        for more in ([], ["--file-timeout", "42"]):
            args = ["score", str(tmp_path), "--model", str(tmp_path / run), "--out", str(tmp_path / "s.csv"), *more]
            assert cli.main(args) == 2
    assert limits == {"slides": [SLIDE_TIMEOUT, 42.0], "files": [FILE_TIMEOUT, 42.0]}
