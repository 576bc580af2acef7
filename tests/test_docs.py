"""The documentation: the generated recipe reference, the relative links, and a strict mkdocs build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from medvision.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
HOOK = DOCS / "hooks" / "recipe_reference.py"


def _load_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("recipe_reference", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hook = _load_hook()


# ------------------------------------------------------------------------------ recipe reference


def _alternatives(annotation: Any) -> Iterator[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            yield from _alternatives(arg)
    else:
        yield annotation


def _walk(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of every node, by dotted key; ``[]`` marks the items of a list of models."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        yield key, field
        for alt in _alternatives(field.annotation):
            if isinstance(alt, type) and issubclass(alt, BaseModel):
                yield from _walk(alt, key)
            elif get_origin(alt) is list:
                for item in get_args(alt):
                    if isinstance(item, type) and issubclass(item, BaseModel):
                        yield from _walk(item, f"{key}[]")


def _reference_rows(markdown: str) -> dict[str, list[str]]:
    """Table rows of the reference page by key: ``| `key` | type | default | description |``."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        match = re.match(r"^\| `([^`]+)` \|", line)
        if match:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip())[1:-1]]
            assert match.group(1) not in rows, f"key {match.group(1)} is listed twice"
            rows[match.group(1)] = cells
    return rows


def test_reference_lists_every_recipe_key_with_a_description() -> None:
    assert hook.recipe_root() is Recipe
    fields = dict(_walk(Recipe))
    # the walk reaches nested sections and the items of lists of sections
    for key in (
        "data.dicom.windows",
        "data.slides.target_mpp",
        "train.phases[].lr",
        "evaluation.operating_points[].rule",
    ):
        assert key in fields
    undocumented = [key for key, field in fields.items() if not (field.description or "").strip()]
    assert not undocumented, f"recipe fields without a docstring: {undocumented}"

    markdown = hook.recipe_reference_markdown()
    rows = _reference_rows(markdown)
    assert set(rows) == set(fields), (
        f"missing from the reference: {sorted(set(fields) - set(rows))}; "
        f"not recipe keys: {sorted(set(rows) - set(fields))}"
    )
    for key, cells in rows.items():
        assert len(cells) == 4, f"{key}: expected key, type, default, description; got {cells}"
        assert all(cells), f"{key}: an empty cell in {cells}"
    assert rows["data.source"][2] == "**required**"
    assert rows["train.phases[].epochs"][2] == "**required**"
    assert rows["data.image_size"][2] == "`224`"
    assert "section" in rows["data.dicom"][1]
    for section in ("data", "data.dicom", "data.slides", "train.phases[]", "evaluation.operating_points[]", "pretrain"):
        assert f"## `{section}`" in markdown


# ---------------------------------------------------------------------------------------- links

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def _links(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)  # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return _LINK.findall(text) + _REF_LINK.findall(text)


def _is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def test_relative_links_point_to_files_that_exist() -> None:
    generated = (DOCS / hook.PAGE).resolve()
    checked, broken = 0, []
    for md in _markdown_files():
        for target in _links(md.read_text(encoding="utf-8")):
            if not _is_relative(target):
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (md.parent / path).resolve()
            in_site = md.is_relative_to(DOCS) and resolved == generated  # built by the mkdocs hook
            if not (resolved.exists() or in_site):
                broken.append(f"{md.relative_to(REPO)}: {target}")
            checked += 1
    assert checked > 50, f"only {checked} relative links found; is the link pattern right?"
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_images_display_from_the_readme_and_the_pages() -> None:
    readme = _links((REPO / "README.md").read_text(encoding="utf-8"))
    pages = [t for md in DOCS.rglob("*.md") for t in _links(md.read_text(encoding="utf-8"))]
    for image in ("breastmnist_report.png", "label_efficiency.png", "slide_heatmap.png"):
        assert f"docs/{image}" in readme
        assert any(t.endswith(image) for t in pages)


def test_docs_name_no_module_file_paths() -> None:
    """Modules move; the docs describe commands and recipe keys, not ``medvision/<module>.py`` files."""
    offenders = [
        f"{md.relative_to(REPO)}: {m}"
        for md in _markdown_files()
        for m in re.findall(r"medvision/[\w/]+\.py", md.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------ build


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    reference = (site / "reference" / "recipe" / "index.html").read_text(encoding="utf-8")
    assert "data.dicom.windows" in reference and "train.phases[].lr" in reference
    for image in ("breastmnist_report.png", "label_efficiency.png", "slide_heatmap.png"):
        assert (site / image).is_file()
    assert not (site / "hooks").exists(), "the hook's source should not be published"
