"""The recipe reference page, generated from the recipe models' field docstrings.

The recipe is a pydantic model tree whose fields carry their meaning as attribute docstrings
(``use_attribute_docstrings=True``), so ``FieldInfo.description`` is the documentation. This module
walks that tree from the root model, section by section (nested models and the items of lists of
models become sections of their own), and writes one Markdown table per section: full dotted key,
type, default and description.

It is an mkdocs hook (registered under ``hooks:`` in ``mkdocs.yml``): ``on_files`` adds the page as
a generated file, so nothing is written into ``docs/``. The generator is importable on its own:

    >>> markdown = recipe_reference_markdown()
"""

from __future__ import annotations

import importlib
import re
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

PAGE = "reference/recipe.md"
"""Where the generated page lives in the site (relative to ``docs_dir``)."""

RECIPE_ROOT = "medvision.recipe:Recipe"
"""``module:attribute`` of the root recipe model."""

GUIDE = "../recipes.md"
"""The hand-written recipe guide, relative to the generated page."""


@dataclass(frozen=True)
class Section:
    """One node of the recipe tree: ``path`` is its dotted key (``""`` for the top level)."""

    path: str
    model: type[BaseModel]


def recipe_root() -> type[BaseModel]:
    """Imports the root recipe model named by :data:`RECIPE_ROOT`."""
    module_name, attr = RECIPE_ROOT.split(":")
    root = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(root, type) and issubclass(root, BaseModel)):
        raise TypeError(f"{RECIPE_ROOT} is not a pydantic model")
    return root


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section-valued field (``Model`` or ``Model | None``), else ``None``."""
    return next((a for a in _union_args(annotation) if _is_model(a)), None)


def item_model(annotation: Any) -> type[BaseModel] | None:
    """The item model of a list-of-models field (``list[Model]``, optionally ``| None``), else ``None``."""
    for arg in _union_args(annotation):
        if get_origin(arg) is list:
            (item,) = get_args(arg) or (None,)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def child_path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def sections(root: type[BaseModel] | None = None) -> list[Section]:
    """Every node of the tree, depth first in field order: the top level, then ``data``, ``data.dicom``, ..."""
    out: list[Section] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        out.append(Section(path, model))
        for name, field in model.model_fields.items():
            key = child_path(path, name)
            if (sub := nested_model(field.annotation)) is not None:
                visit(key, sub)
            elif (item := item_model(field.annotation)) is not None:
                visit(f"{key}[]", item)

    visit("", root or recipe_root())
    return out


def anchor(path: str) -> str:
    """The heading id of a section: ``train.phases[]`` becomes ``train-phases``."""
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "top-level"


# ------------------------------------------------------------------------------------ formatting


def _type_text(annotation: Any) -> str:
    """A compact, YAML-minded spelling of a type: ``"auto" | int``, ``float | null``, ``list[str]``."""
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        return " | ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list[{', '.join(_type_text(a) for a in get_args(annotation))}]"
    if get_origin(annotation) is dict:
        return f"dict[{', '.join(_type_text(a) for a in get_args(annotation))}]"
    if _is_model(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: FieldInfo) -> list[str]:
    out: list[str] = []
    for meta in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{symbol} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            out.append(f"matches `{pattern}`")
    return out


def _escape_pipes(text: str) -> str:
    """Escapes ``|`` outside code spans, where it would split a table cell."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def type_cell(path: str, field: FieldInfo) -> str:
    annotation = field.annotation
    if nested_model(annotation) is not None:
        text = f"section: [`{path}`](#{anchor(path)})"
    elif item_model(annotation) is not None:
        text = f"list of [`{path}[]`](#{anchor(path + '[]')}) items"
    else:
        text = f"`{_type_text(annotation)}`"
    return ", ".join([text, *_constraints(field)])


def _yaml(value: Any) -> str:
    """A default as it would be written in a recipe (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./${}:<>+-]+", value) else f'"{value}"'
    if isinstance(value, BaseModel):
        return _yaml(value.model_dump(mode="json", exclude_defaults=True))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_cell(path: str, field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if nested_model(field.annotation) is not None and field.default_factory is not None:
        return f"see [`{path}`](#{anchor(path)})"
    factory: Any = field.default_factory
    value = factory() if factory is not None else field.default
    if value is PydanticUndefined:
        return "**required**"
    return f"`{_yaml(value)}`"


def description_cell(field: FieldInfo) -> str:
    """The field's docstring on one line, reST ``code`` turned into Markdown `code`."""
    text = " ".join((field.description or "").split())
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    return _escape_pipes(text)


def section_markdown(section: Section) -> str:
    title = f"`{section.path}`" if section.path else "Top level"
    lines = [f"## {title} {{#{anchor(section.path)}}}", ""]
    if section.path.endswith("[]"):
        lines += [f"Each item of the `{section.path[:-2]}` list has these keys.", ""]
    if section.model.model_config.get("extra") == "allow":
        lines += ["Keys not listed here are allowed too and passed on as they are.", ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in section.model.model_fields.items():
        key = child_path(section.path, name)
        lines.append(f"| `{key}` | {type_cell(key, field)} | {default_cell(key, field)} | {description_cell(field)} |")
    return "\n".join(lines) + "\n"


def recipe_reference_markdown() -> str:
    """The whole reference page: an introduction, a list of sections, then one table per section."""
    found = sections()
    toc = "\n".join(f"- [{f'`{s.path}`' if s.path else 'Top level'}](#{anchor(s.path)})" for s in found)
    intro = f"""# Recipe reference

Every key a recipe can hold, with its type, default and meaning. This page is generated when the
site is built, from the documentation of the recipe's typed tree itself, so it lists exactly the
keys that `medvision train` accepts. The [recipe guide]({GUIDE}) walks through a real recipe and
explains strict loading, overrides, freeze phases, data sources and weights.

Keys are written as full dotted paths, the same paths that `--set KEY=VALUE` overrides and error
messages use. `[]` stands for an item of a list: `train.phases[].lr` is the `lr` of each phase,
set with `--set train.phases[1].lr=3e-4`. A **required** key has no default. Defaults are written
as they would be in YAML (`null` is no value).

Sections:

{toc}
"""
    return "\n".join([intro, *(section_markdown(s) for s in found)])


# ----------------------------------------------------------------------------------- mkdocs hook


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """mkdocs hook: adds the generated reference page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=recipe_reference_markdown()))
    return files
