"""Placement is pure: it imports no kopf, kubernetes, torch or triton, and not scipy
either (the exact reference imports it only when called); and plans do not depend on
the interpreter's hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import EXAMPLES, ROOT

HEAVY = ("kopf", "kubernetes", "torch", "triton", "scipy", "numpy")
MODULES = [
    "kvpilot.operator.placement", "kvpilot.operator.placement.exact",
    "kvpilot.operator.placement.check", "kvpilot.cli",
]


def run(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **env,
             "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"},
    ).stdout


def test_placement_imports_nothing_heavy():
    for module in MODULES:
        code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
                f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} "
                f"& set({list(HEAVY)!r}))))")
        assert json.loads(run(code)) == [], module


def test_the_check_sees_a_heavy_import():
    code = ("import json, sys, scipy.optimize; "
            "print(json.dumps('scipy' in {m.split('.')[0] for m in sys.modules}))")
    assert json.loads(run(code)) is True


def test_plans_do_not_depend_on_the_hash_seed():
    code = (
        "from kvpilot.cli import main; "
        f"main(['plan', {str(EXAMPLES / 'fleets' / 'mixed.yaml')!r}, "
        + ", ".join(repr(str(p)) for p in sorted(EXAMPLES.glob('*.yaml')))
        + ", '-o', 'json'])"
    )
    outputs = {run(code, PYTHONHASHSEED=seed) for seed in ("1", "2", "3")}
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["assignments"]
