"""The shape of the code, as docs/architecture.md draws it: imports run down the floors only, no cycle but the one
type-only pair of the op table, every file and class small enough to hold in mind, every source file named in
the architecture page, and no plotting package imported by the library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "cnnmod"

# lowest first: a module may import its own floor and those below, never one above
FLOORS = [
    ["errors", "progress", "runtime", "artifacts"],
    ["data"],
    ["core"],
    ["models"],
    ["modules"],
    ["composition"],
    ["node", "slim"],
    ["reuse", "io", "recipes", "api"],
    ["energy"],
    ["jobs"],
    ["experiments"],
    ["cli", "__init__", "__main__"],
]
TYPE_ONLY_CYCLE = {"cnnmod.core.graph", "cnnmod.core.ops"}  # a type annotation each way


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = ["cnnmod", *p.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The cnnmod modules ``name`` imports (at any depth of its code, type-only imports too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("cnnmod"):
                found.add(t)
                break
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(name: str) -> int:
    head = name.split(".")[1] if "." in name else "__init__"
    return next(i for i, names in enumerate(FLOORS) if head in names)


def test_imports_run_down_the_floors_only():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if _floor(b) > _floor(a))
    assert upward == []


def test_no_import_cycle_but_the_op_tables_type_only_pair():
    """Strongly connected modules (packages' __init__ files, which re-export, left out)."""
    graph = {a: {b for b in bs if not MODULES[b].name == "__init__.py"} for a, bs in GRAPH.items()
             if MODULES[a].name != "__init__.py"}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    assert [c for c in cycles if c != TYPE_ONLY_CYCLE] == []


@pytest.mark.parametrize("limit_file,limit_class,limit_params", [(450, 250, 8)])
def test_files_classes_and_signatures_stay_small(limit_file, limit_class, limit_params):
    """No file over 450 lines, no class over 250, no function over 8 parameters (the command line's commands,
    one parameter per option, aside)."""
    too_long, too_big, too_many = [], [], []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > limit_file:
            too_long.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit_class:
                too_big.append(f"{name}.{node.name}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not name.startswith("cnnmod.cli"):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                n -= bool(a.args and a.args[0].arg in ("self", "cls"))
                if n > limit_params:
                    too_many.append(f"{name}.{node.name} ({n})")
    assert (too_long, too_big, too_many) == ([], [], [])


def test_every_source_file_is_named_in_the_architecture_page():
    page = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.stem not in page]
    assert missing == []


def test_the_library_and_its_command_line_import_no_plotting_package():
    code = ("import sys, cnnmod, cnnmod.cli, cnnmod.jobs.decompose, cnnmod.jobs.compose, cnnmod.jobs.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_assertion_sits_in_a_message_slot():
    """``assert a, b == c`` checks ``a`` only: a comparison in an assertion's message is a check that never runs."""
    found = []
    for path in sorted(SRC.parent.parent.joinpath("tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert) and node.msg is not None and any(
                    isinstance(n, ast.Compare) for n in ast.walk(node.msg)):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
