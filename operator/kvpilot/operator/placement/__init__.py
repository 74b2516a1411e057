"""Placement: which GPUs of which node each LLM replica gets, decided by HBM.

``place(snapshot, demands, policy) -> Plan`` is a pure function (no kopf, kubernetes or
torch; ``ilp`` imports the HiGHS solver only when it solves). The operator
builds the snapshot from its node and pod indexes, the planner CLI from a fleet file;
both build demands from Model objects with :func:`demands_from_models`, which sizes a
replica with the memory model of ``kvpilot.api.memory``.
"""

from kvpilot.operator.placement.engine import place
from kvpilot.operator.placement.inputs import (
    demand_for, demands_from_models, requirement, servable, snapshot_from_fleet,
)
from kvpilot.operator.placement.model import (
    ANY_PRODUCT, SPREADS, Assignment, Crowded, Demand, Existing, Move, Node, NodeUsage, Plan,
    Policy, Requirement, Snapshot, Unplaced,
)
from kvpilot.operator.placement.simulate import Simulation, snapshot_without, without

__all__ = [
    "ANY_PRODUCT", "SPREADS", "Assignment", "Crowded", "Demand", "Existing", "Move", "Node",
    "NodeUsage", "Plan", "Policy", "Requirement", "Simulation", "Snapshot", "Unplaced",
    "demand_for",
    "demands_from_models", "place", "requirement", "servable", "snapshot_from_fleet",
    "snapshot_without", "without",
]
