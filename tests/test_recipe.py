from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medvision.recipe import DataConfig, RecipeError, apply_override, dump_recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def minimal() -> dict:
    return {
        "name": "r",
        "data": {"source": "npz", "path": "x.npz"},
        "model": {"name": "resnet18"},
        "train": {"phases": [{"epochs": 1, "lr": 1e-3}, {"epochs": 2, "lr": 1e-4, "trainable": "all"}]},
    }


def error_of(tree: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tree, overrides=overrides)
    return str(err.value)


def test_misspelt_key_names_full_path_and_suggests() -> None:
    tree = minimal()
    tree["train"]["phases"][1]["lrr"] = 0.1
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tree, origin="'my.yaml'")
    msg = str(err.value)
    assert "invalid recipe 'my.yaml'" in msg
    assert "train.phases[1].lrr: unknown key; did you mean 'lr'?" in msg


def test_unknown_top_level_and_nested_keys() -> None:
    tree = minimal()
    tree["modle"] = {}
    tree["data"]["image_szie"] = 64
    msg = error_of(tree)
    assert "modle: unknown key; did you mean 'model'?" in msg
    assert "data.image_szie: unknown key; did you mean 'image_size'?" in msg


def test_values_are_type_checked() -> None:
    tree = minimal()
    tree["train"]["phases"][0]["lr"] = "1e-3"  # what YAML 1.1 gives for a bare 1e-3
    assert recipe_from_dict(tree).train.phases[0].lr == pytest.approx(1e-3)
    tree["train"]["phases"][0]["lr"] = "fast"
    msg = error_of(tree)
    assert "train.phases[0].lr" in msg and "'fast'" in msg
    tree = minimal()
    tree["train"]["amp"] = "fp8"
    assert "train.amp" in error_of(tree)


def test_missing_key_and_cross_field_rules() -> None:
    tree = minimal()
    del tree["model"]
    assert "model.name is required" in error_of(tree)
    tree = minimal()
    tree["data"].update(val_fraction=0.6, test_fraction=0.5)
    assert "below 1" in error_of(tree)
    tree = minimal()
    tree["train"].update(amp="fp16", device="cpu")
    assert "bf16" in error_of(tree)


def test_overrides_parse_yaml_values_and_indices() -> None:
    recipe = recipe_from_dict(minimal(), overrides=["train.phases[1].lr=3e-4", "data.image_size=96",
                                                     "train.phases[0].trainable=[head, stage:-1]"])  # fmt: skip
    assert recipe.train.phases[1].lr == pytest.approx(3e-4)
    assert recipe.data.image_size == 96
    assert recipe.train.phases[0].trainable == ["head", "stage:-1"]
    msg = error_of(minimal(), ["train.phases[0].lrr=1"])
    assert "did you mean 'lr'" in msg
    with pytest.raises(RecipeError, match="out of range"):
        apply_override(minimal(), "train.phases[5].lr=1")
    with pytest.raises(RecipeError, match="has no '='"):
        apply_override(minimal(), "train.epochs")


def test_defaults_paths_and_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDVISION_SHARED", "/data/shared")
    tree = minimal()
    tree["data"]["path"] = "${MEDVISION_SHARED}/bloodmnist.npz"
    recipe = recipe_from_dict(tree)
    assert recipe.data.path == "/data/shared/bloodmnist.npz"
    assert [p.name for p in recipe.train.phases] == ["phase0", "phase1"]
    assert recipe.train.phases[0].trainable == ["all"]
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_recipe(recipe))
    assert load_recipe(saved) == recipe


def test_an_unset_variable_in_a_path_names_the_recipe_and_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_DATA_ROOT", raising=False)
    saved = tmp_path / "site.yaml"
    tree = minimal()
    tree["model"]["init_from"] = "${NOPE_DATA_ROOT}/runs/r1"
    saved.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError) as err:
        load_recipe(saved)
    assert str(err.value) == (
        f"invalid recipe {str(saved)!r}:\n  model.init_from: environment variable "
        "${NOPE_DATA_ROOT} is not set (used in path '${NOPE_DATA_ROOT}/runs/r1')"
    )
    monkeypatch.setenv("NOPE_DATA_ROOT", "/data")
    assert load_recipe(saved).model.init_from == "/data/runs/r1"


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_recipe_that_is_a_folder_not_utf8_or_has_a_key_twice_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="is a folder; expected a recipe YAML file"):
        load_recipe(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1\.yaml' is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_recipe(latin1)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: t\ntrain:\n  phases:\n    - {epochs: 1, lr: 3.0e-3}\n  amp: none\n  amp: bf16\n")
    with pytest.raises(RecipeError, match=r"not valid YAML: the key 'amp' is given twice \(lines 5 and 6\)"):
        load_recipe(twice)


def test_an_override_whose_value_is_not_yaml_and_a_misspelt_window_are_clear_errors() -> None:
    with pytest.raises(RecipeError, match=r"override 'data.image_size=\[1': its value '\[1' is not valid YAML"):
        apply_override({}, "data.image_size=[1")
    with pytest.raises(RecipeError, match=r"override .*is not valid YAML"):
        apply_override({}, "data.path=!!python/object:os.system")
    for window in ({"centre": 40, "width": 80}, {"center": 40, "width": 80, "level": 3}):
        with pytest.raises(ValueError, match=r"expected exactly the keys center and width"):  # pydantic's
            DataConfig.model_validate({"source": "dicom", "path": "x", "dicom": {"windows": [window]}})


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    # a pretraining recipe needs no fine-tuning phases, nor does a MIL head on cached features
    assert recipe.train.phases or "simclr" in path.name or recipe.data.source == "slide_features"
    assert yaml.safe_load(dump_recipe(recipe))["name"] == recipe.name


def test_a_loaded_recipe_is_frozen_and_changes_go_through_a_validated_copy() -> None:
    recipe = recipe_from_dict(minimal())
    with pytest.raises(ValueError, match="frozen"):
        recipe.train.amp = "bf16"  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        recipe.train.phases[0].lr = 1.0  # type: ignore[misc]
    changed = recipe.changed({"train.amp": "bf16", "train.phases[1].lr": 0.5, "data.limit": 10})
    assert (changed.train.amp, changed.train.phases[1].lr, changed.data.limit) == ("bf16", 0.5, 10)
    assert (recipe.train.amp, recipe.train.phases[1].lr, recipe.data.limit) == ("auto", 1e-4, None)
    assert changed.data.path == recipe.data.path  # paths stay resolved
    with pytest.raises(RecipeError, match=r"train\.amp"):
        recipe.changed({"train.amp": "fp8"})
    assert [p.name for p in recipe.train.phases] == ["phase0", "phase1"]  # unnamed phases are named on loading
