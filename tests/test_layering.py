"""Pure layers stay pure: the API contract and the placement engine import no kopf,
kubernetes, torch or triton, nor HiGHS/numpy (placement imports its ILP solver only
when it solves); placement's modules import one another without a circle, and none of
its steps imports the engine back; and plans do not depend on the interpreter's hash
seed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES
from tests.layering_helpers import import_cycle, imported_heavy, package_imports, run

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


PLACEMENT = "kvpilot.operator.placement"
# Above the engine: the package's front door and the scale-down simulator, which call
# place(). Every other module is a step the engine orchestrates, or something below.
ENGINE_CALLERS = {"__init__", "simulate"}


def test_placement_imports_no_module_in_a_circle():
    """The run's state lives in ``plan_state``, which the steps take as an argument;
    a step that needs another's state does not import its owner back."""
    graph = package_imports(PLACEMENT)
    assert {"engine", "plan_state", "search", "improve"} <= set(graph)
    assert import_cycle(graph) == []


def test_no_placement_step_imports_the_engine():
    graph = package_imports(PLACEMENT)
    assert sorted(m for m, deps in graph.items() if "engine" in deps) == sorted(ENGINE_CALLERS)
    assert not graph["plan_state"] & {"engine", "construct", "search", "spread", "improve",
                                      "ilp", "orders", "assemble"}


def test_the_check_detects_an_import_circle():
    graph = {"engine": {"packing"}, "packing": {"state"}, "state": {"engine"}, "x": set()}
    assert import_cycle(graph) == ["engine", "packing", "state", "engine"]
    assert import_cycle({"a": {"b"}, "b": set()}) == []


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
