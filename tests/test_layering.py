"""Pure layers stay pure: the API contract imports no kopf, kubernetes, torch or triton."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("kopf", "kubernetes", "torch", "triton")
PURE_MODULES = [
    "kvpilot.api.model", "kvpilot.api.memory", "kvpilot.api.quantity", "kvpilot.api.gpus",
    "kvpilot.api.fleet", "kvpilot.api.files", "kvpilot.api.crd",
]


def imported_heavy(module: str) -> list[str]:
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={"PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker'}"}, cwd=ROOT,
    ).stdout
    return json.loads(out)


def test_api_imports_nothing_heavy():
    for module in PURE_MODULES:
        assert imported_heavy(module) == [], module


def test_the_check_detects_a_heavy_import():
    assert "kopf" in imported_heavy("kopf")
