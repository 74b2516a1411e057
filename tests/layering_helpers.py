"""Which heavy packages (kopf, kubernetes, torch, triton, HiGHS, numpy) a module pulls in,
asked of a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("kopf", "kubernetes", "torch", "triton", "highspy", "numpy")


def run(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **env,
             "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"},
    ).stdout


def imported_heavy(module: str) -> list[str]:
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} "
            f"& set({list(HEAVY)!r}))))")
    return json.loads(run(code))


def package_imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (by its short name, "__init__"
    for the package itself), read from the source: every import counts, those under
    ``if TYPE_CHECKING`` or inside a function included."""
    import ast

    folder = ROOT / "operator" / package.replace(".", "/")
    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith(package + "."):
                    short = name[len(package) + 1:].split(".")[0]
                    if (folder / f"{short}.py").exists():
                        found.add(short)
        graph[path.stem] = found - {path.stem}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its modules in order, the first repeated last),
    or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return []
