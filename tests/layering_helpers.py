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
