"""The package's shape: imports of raysd modules sit at module level, run one way (no cycle), and no file
grows past 500 lines. Heavy optional libraries (matplotlib, torchaudio, ray, ...) may still be imported
inside functions; a raysd module may not, since that is how a cycle hides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raysd"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def raysd_imports(tree: ast.AST, module: str) -> list[tuple[str, ast.stmt]]:
    """(imported raysd module, statement) for every import of a raysd module in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.split(".")[0] == "raysd"]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}:{node.lineno}: relative import (raysd imports absolutely)"
            base = node.module or ""
            if base.split(".")[0] != "raysd":
                continue
            for a in node.names:  # ``from raysd.data import audio`` imports the module raysd.data.audio
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node))
    return out


def function_level(tree: ast.AST) -> set[int]:
    """Line numbers of import statements inside a function (or a method)."""
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.add(node.lineno)
    return lines


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = {m for m, _ in raysd_imports(tree, name) if m != name and m in MODULES}
    return edges


# A command line's front module may import the module that does its work when it runs, so that ``--help`` answers
# at once without torch and Ray; each such pair is named here. The importing module never imports it otherwise.
LAZY = {("raysd.search", "raysd.runner"),  # --help without torch or Ray
        ("raysd.searchers", "raysd.schedulers")}  # Ray Tune's scheduler classes load when a study builds one


def test_no_raysd_module_imports_another_inside_a_function() -> None:
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        inner = function_level(tree)
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {m}"
                  for m, node in raysd_imports(tree, name) if node.lineno in inner and (name, m) not in LAZY]
    assert not found, "raysd modules imported inside functions:\n" + "\n".join(sorted(set(found)))


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_imports_and_cycles() -> None:
    tree = ast.parse("import os\nfrom raysd.data import audio\n\ndef f():\n    from raysd import storage\n")
    found = raysd_imports(tree, "raysd.x")
    assert [m for m, _ in found] == ["raysd.data.audio", "raysd.storage"]
    assert function_level(tree) == {5}
    assert graph()["raysd.report.ensembles"] >= {"raysd.artifacts", "raysd.report.board"}


def test_no_file_is_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_search_commands_help_needs_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom raysd import search\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: search.parse_args(['--help'])\n    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'optuna', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
