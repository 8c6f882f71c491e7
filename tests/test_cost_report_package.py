"""The cost report's package layout: `import sdpo_kernels` leaves it out, its modules import one way
(no cycles) and stay small, and the entry points the scripts and tests name still resolve."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import sdpo_kernels

PACKAGE = pathlib.Path(sdpo_kernels.__file__).parent / "cost_report"
MAX_LINES = 500


def test_import_sdpo_kernels_does_not_import_the_cost_report():
    code = "import sys, sdpo_kernels; print([m for m in sys.modules if 'cost_report' in m])"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _sibling_imports(path: pathlib.Path) -> set[str]:
    """Names of the package's modules that `path` imports (`from .x import ...`, `from . import x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(a.name for a in node.names)
    return names


def test_modules_import_one_way_and_stay_small():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _sibling_imports(p) - {"__init__"} for name, p in modules.items() if name != "__init__"}
    for name, deps in graph.items():
        assert deps <= set(modules), f"{name} imports unknown modules {deps - set(modules)}"
    # Depth-first search for a cycle.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*trail, node, dep])}"
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    for name, path in modules.items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name}.py has {lines} lines"
    assert not (PACKAGE.parent / "cost_report.py").exists()  # the package replaced the module


def test_the_names_scripts_and_tests_use_resolve():
    from sdpo_kernels import compile_check, cost_report

    for name in ("VARIANTS", "build_report", "render_markdown", "main", "compile_launch", "ctas_per_sm", "_jit_kwargs"):
        assert hasattr(cost_report, name), name
    assert callable(compile_check.launches)
    help_text = subprocess.run(
        [sys.executable, "-m", "sdpo_kernels.cost_report", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert help_text.startswith("usage: cost_report.py")  # as when the report was one module
    assert cost_report.cli.DESCRIPTION == cost_report.__doc__.splitlines()[0]
