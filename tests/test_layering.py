"""Pure layers stay pure: the API contract and the placement engine import no kopf,
kubernetes, torch or triton, nor HiGHS/numpy (placement imports its ILP solver only
when it solves); and plans do not depend on the interpreter's hash seed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES
from tests.layering_helpers import imported_heavy, run

PURE_MODULES = [
    "kvpilot.api.model", "kvpilot.api.memory", "kvpilot.api.quantity", "kvpilot.api.gpus",
    "kvpilot.api.fleet", "kvpilot.api.files", "kvpilot.api.crd", "kvpilot.api.source",
    "kvpilot.api.checkpoint",
    "kvpilot.operator.placement", "kvpilot.operator.placement.exact",
    "kvpilot.operator.placement.check", "kvpilot.cli",
    "kvpilot.operator.objects", "kvpilot.operator.view", "kvpilot.operator.reconcile",
    "kvpilot.operator.settings", "kvpilot.operator.leader", "kvpilot.operator.autoscale",
    "kvpilot.worker.block_manager", "kvpilot.worker.scheduler", "kvpilot.worker.stats",
    # not decision logic, but the weights' init container: it starts without torch
    "kvpilot.worker.fetch",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_nothing_heavy(module):
    assert imported_heavy(module) == []


def test_the_check_detects_a_heavy_import():
    assert "highspy" in imported_heavy("highspy")


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
