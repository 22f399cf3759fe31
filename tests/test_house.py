"""The house rules of ../shared/STYLE.md, checked on the code itself: the import graph of
orchestrator/, trainers/ and datasets_ (function-local imports included) has no cycle and no
arrow pointing back up the study's path, modules and functions stay readable, and ruff is clean."""

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "trainers", "datasets_")
# Layers of orchestrator/, along a study's path: a module imports its own subpackage and lower
# ranks only (records/schema.py is the leaf everyone may import; records sits beside spec).
RANK = {"spec": 0, "records": 0, "planning": 1, "execution": 2, "analysis": 2, "cli": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(package[: len(package) - node.level + 1] + [node.module or ""])
                    if node.level
                    else node.module or ""
                )
                targets = [base.rstrip(".")] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "orchestrator" and len(parts) > 1 else None


def test_the_import_graph_has_no_cycle():
    assert _cycles(import_graph()) == []


def test_imports_point_down_the_study_path():
    wrong = []
    for a, targets in import_graph().items():
        for b in targets:
            top_a, top_b = a.split(".")[0], b.split(".")[0]
            if top_a == "datasets_" and top_b != "datasets_" or top_a == "trainers" and top_b == "orchestrator":
                wrong.append(f"{a} -> {b}")
            la, lb = _layer(a), _layer(b)
            if la and lb and la != lb and not RANK[lb] < RANK[la] and b != "orchestrator.records.schema":
                wrong.append(f"{a} -> {b}")
    assert wrong == []


def test_the_orchestrator_is_a_few_rooms():
    direct = [p.name for p in (REPO / "orchestrator").glob("*.py")]
    rooms = sorted(p.name for p in (REPO / "orchestrator").iterdir() if (p / "__init__.py").exists())
    assert len(direct) <= 6 and rooms == sorted(RANK)


def test_modules_and_functions_fit_on_a_reader_s_screen():
    long = []
    for name, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > 600:
            long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_private_names_stay_in_their_module():
    crossing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                crossing += [
                    f"{name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert crossing == []


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    lint = subprocess.run([ruff, "check", "--quiet", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([ruff, "format", "--check", "--quiet", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]
