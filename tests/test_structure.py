"""The package's shape: shared layers that never import upward, tasks on top, no import cycle, no huge module.

The layer of a module is the longest prefix of its dotted name in :data:`LAYERS`. A module may import
its own layer or any lower one, at the top of the file or inside a function alike (an import inside a
function hides a cycle; it does not remove it). Imports under ``if TYPE_CHECKING:`` are annotations only
and do not count. A new module must be given a layer here: the test names any that has none.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medvision"

#: Lowest first. Shared layers (0-8) never import a task (9); the CLI (10) sits on the tasks.
LAYERS = {
    "medvision": 0,
    "medvision.errors": 0,
    "medvision.options": 0,
    "medvision.io": 0,
    "medvision.workers": 0,
    "medvision.metrics": 0,
    "medvision.intervals": 0,
    "medvision.recipe": 1,
    "medvision.recipe_nodes": 1,
    "medvision.evaluation": 2,
    "medvision.runs": 2,
    "medvision.tracking": 2,
    "medvision.plots": 2,
    "medvision.data": 3,
    "medvision.wsi": 3,
    "medvision.runtime": 4,
    "medvision.models": 5,
    "medvision.training": 6,
    "medvision.report": 6,
    "medvision.gradcam": 6,
    "medvision.inference": 7,
    "medvision.results": 8,
    "medvision.tasks": 9,
    "medvision.cli": 10,
    "medvision.__main__": 10,
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """medvision modules that ``module`` imports anywhere in its body, TYPE_CHECKING blocks excepted."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names]
            else:
                visit(child)
                continue
            for target in targets:
                resolved = _resolve(target, modules) if target.startswith("medvision") else None
                if resolved and resolved != module:
                    found.add(resolved)

    visit(ast.parse(path.read_text()))
    return found


def _layer(module: str) -> int | None:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, f"give these modules a layer in tests/test_structure.py LAYERS: {missing}"


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in sorted(_graph().items())
        for t in sorted(targets)
        if (_layer(m) or 0) < (_layer(t) or 0)
    ]
    assert upward == []


def test_shared_layers_never_import_a_task() -> None:
    shared = {
        m: t
        for m, t in _graph().items()
        if not m.startswith(("medvision.tasks", "medvision.cli", "medvision.__main__"))
    }
    offenders = sorted(
        f"{m} -> {x}" for m, targets in shared.items() for x in targets if x.startswith("medvision.tasks")
    )
    assert offenders == []


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above would catch what they guard against (on a made-up graph)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _layer("medvision.data.sources") == 3 and _layer("medvision.tasks.score") == 9


def test_every_pool_forks_from_a_server_that_has_its_worker_code_loaded() -> None:
    """A process has one forkserver, started by whichever pool comes first, so every pool's worker code must be in
    the one preload set: a slide reader forked from a server that a DICOM decode started used to re-import torch
    (seconds) for every worker it started or replaced."""
    from medvision import workers
    from medvision.data import dicom_source
    from medvision.tasks.score import files, slides

    code = [dicom_source._decode_chunk, dicom_source._init_decoder, files.read_chunk, files.init_worker,
            slides._plan_chunk, slides._init_planner, slides._read_batches, slides._init_reader]  # fmt: skip
    assert {fn.__module__ for fn in code} <= set(workers.WORKER_MODULES)
    assert workers._context().get_start_method() == "forkserver"


def test_the_command_line_parses_without_loading_torch() -> None:
    """``medvision --help`` and a mistyped option answer at once: the parser's module imports no task, torch, timm
    or scikit-learn (6 s on 2 cores before); a command imports its task once it is understood."""
    heavy = "{'torch', 'timm', 'sklearn', 'medvision.tasks'}"
    code = f"import sys, medvision.cli; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert LAYERS["medvision.options"] == 0 and "medvision.options" in _graph()["medvision.cli"]
