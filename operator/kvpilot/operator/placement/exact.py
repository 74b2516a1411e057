"""An exact reference for small instances (ILP, HiGHS) and an LP lower bound.

Tests and the benchmark use it to measure how far ``place()`` is from optimal: the
same ILP and LP bound as ``ilp``, solved without a work limit, from a snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence

from kvpilot.operator.placement.ilp import NewReplica, relaxation_bound, solve_ilp
from kvpilot.operator.placement.model import (
    Assignment, Demand, Existing, NodeUsage, Plan, Policy, Snapshot, Unplaced,
)
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.state import existing_load


@dataclass(frozen=True)
class ExactResult:
    status: str  # "optimal", "time limit" (best found so far), "no solution"
    placed: int
    demanded: int
    gpus_used: Optional[int]  # of the solution found
    bound: Optional[float]  # lower bound on GPUs used when every replica is placed
    plan: Optional[Plan]
    seconds: float

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


class _Residual(NamedTuple):
    """The engine's own view after existing replicas: the state, the replicas kept, and
    the replicas still to place per model (the engine's ``pending``)."""

    state: PlanState
    kept: list[Existing]
    residual: dict[str, int]


def _residual(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy) -> _Residual:
    state = PlanState(snapshot, demands, policy)
    kept = state.load_existing().kept
    # Spreading models are held to one replica per node (GPU), on any product they may
    # use: the limits place() starts from, without its preference for the products where
    # a replica takes its fewest GPUs (a plan of place() that crowds no model is one of
    # this reference's).
    state.narrow.clear()
    return _Residual(state, kept, dict(state.pending))


def solve(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy = Policy(),
          time_limit: float = 60.0) -> ExactResult:
    """The placement with the most replicas and then the fewest GPUs with load."""
    started = time.perf_counter()
    state, kept, residual = _residual(snapshot, demands, policy)
    demanded = sum(max(0, r) for r in residual.values())
    sol = solve_ilp(state, residual, time_limit=time_limit)
    seconds = time.perf_counter() - started
    if sol.status == "none":
        return ExactResult("no solution", 0, demanded, None, None, None, seconds)
    plan = _plan(state, kept, sol.new, residual)
    status = "optimal" if sol.status == "optimal" else "time limit"
    bound = sol.bound if sol.new or demanded else float(plan.gpus_used)
    return ExactResult(status, len(sol.new), demanded, plan.gpus_used, bound, plan, seconds)


def _plan(state: PlanState, kept: list[Existing], new: list[NewReplica],
          residual: dict[str, int]) -> Plan:
    """A plan from the exact solution, built on the same states (for checking it)."""
    rows = []
    for e in kept:
        step = existing_load(e, state.by_model.get(e.model),
                             state.by_name[e.node].node.product).step_bytes
        rows.append(Assignment(e.name, e.model, e.node, tuple(e.gpus), e.hbm_per_gpu,
                               existing=True, step_bytes=step))
    counter: dict[str, int] = {}
    for d, s, gpus, req in new:
        s.add(d.model, gpus, req.hbm_per_gpu, req.step_bytes, req.step_budget)
        i = counter.get(d.model, 0)
        counter[d.model] = i + 1
        rows.append(Assignment(f"{d.model}-{i}", d.model, s.node.name, gpus, req.hbm_per_gpu,
                               req.kv_tokens, step_bytes=req.step_bytes))
    by_name = {s.node.name: s for s in state.nodes}
    assignments = tuple(
        replace(a, shared=any(by_name[a.node].tenants[g] > 1 for g in a.gpus)) for a in rows)
    nodes = tuple(NodeUsage(s.node.name, s.node.product, s.cap, tuple(s.cap - f for f in s.free),
                            s.node.schedulable, tuple(s.streamed)) for s in state.nodes)
    unplaced = tuple(
        Unplaced(f"{model}-{i}", model, "not placed by the exact solver")
        for model, want in residual.items() for i in range(counter.get(model, 0), want)
    )
    return Plan(assignments=assignments, unplaced=unplaced, nodes=nodes,
                moves_avoided=len(kept))


def lp_bound(snapshot: Snapshot, demands: Sequence[Demand],
             policy: Policy = Policy()) -> Optional[float]:
    """A lower bound on GPUs used by any plan that places every demanded replica, or
    None when not even the relaxation can place them all (``ilp.relaxation_bound``)."""
    state, _, residual = _residual(snapshot, demands, policy)
    return relaxation_bound(state, residual)
