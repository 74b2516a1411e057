"""``place(snapshot, demands, policy) -> Plan``: the placement decision, as a pure function.

This module orchestrates the steps; each takes the run's state (``plan_state.PlanState``)
as an argument, and none imports this module back.

Order: existing replicas first (``existing``: their HBM and streamed bytes are accounted
before anything new, and they stay where they are unless the policy rebalances), then
new replicas model by model, largest first (``orders``; first-fit decreasing: a large
replica placed late finds only fragments), each on the best node that passes the filters
(``construct``, ``search``). A replica that finds no node gets a reason that says what it
needs, what the best free set is, and what would make it fit (``reasons``).

When the policy optimizes the packing objective (``Policy.optimizes``), the steps that
serve the objective itself, the number of GPUs with load, run too: the replicas of a TP
model go onto a node together, stacked and staggered over the fewest GPUs, and a GPU that
a replica opens is completed at once with the pending replicas that fill it best
(``construct``, ``packing``); replicas left unplaced get room made for them by moving
others, and at the end a bounded ruin-and-recreate search moves replicas, TP groups
included, to empty GPUs (``improve``). All only ever choose among placements the filters
allow. The plan may also be made other ways (fresh GPUs valued otherwise, other model
orders on small instances) and the best kept; on small instances the ILP (``ilp``),
started from that plan, improves it within a work limit: see ``place``.

A model that spreads (``Demand.spread``) is held to its limit by every one of those
steps (``spread``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from kvpilot.operator.placement.assemble import assemble
from kvpilot.operator.placement.construct import place_demand
from kvpilot.operator.placement.ilp import Start, solve_ilp
from kvpilot.operator.placement.improve import consolidate, repair
from kvpilot.operator.placement.model import Demand, Plan, Policy, Snapshot, Unplaced
from kvpilot.operator.placement.orders import alternative_orders, largest_first
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.reasons import explain
from kvpilot.operator.placement.spread import limits_of, respread

CONSOLIDATE_MOVES = 10_000  # replicas moved, at most, by consolidation
# The same beyond small instances (``PlanState.small``): planning time at scale.
CONSOLIDATE_MOVES_LARGE = 1_000
# On small instances, plans with other model orders (``orders.alternative_orders``): at
# most this many, and only while their consolidation has spent fewer replica moves in
# all than this (work, not time: the result does not depend on the machine).
PORTFOLIO_ORDERS = 8
PORTFOLIO_MOVES = 12_000
# Last, on small instances, the ILP (``ilp``), started from the best plan so far, within
# this much work (branch-and-bound nodes x variables: the plan stays a pure function of
# the input), and not beyond this many pending replicas or variables, where its nodes
# take seconds each. When that plan leaves replicas unplaced, one more placed is worth a
# larger solve (the _INCOMPLETE limits). EXACT_SECONDS only guards the operator's loop
# against a solve far slower than on the benchmark's machine; a plan it cuts short is
# dropped.
EXACT_WORK = 200_000
EXACT_VARIABLES = 2_000
EXACT_WORK_INCOMPLETE = 1_000_000
EXACT_VARIABLES_INCOMPLETE = 4_000
EXACT_REPLICAS = 300
EXACT_SECONDS = 60.0

__all__ = ["place"]


class Attempt(NamedTuple):
    """One way of making the plan: the plan, and the run's state after it."""

    plan: Plan
    state: PlanState


def place(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy = Policy()) -> Plan:
    """Place every demanded replica that fits; give a reason for each one that does not.

    When the policy optimizes, the plan may be made more than once, each time valuing
    fresh GPUs differently (see ``search.fresh_values``): when the largest GPUs cannot
    hold the whole demand, once sending replicas that fill a smaller GPU tightly there;
    on a small instance, once opening the product whose GPU the replica and the pending
    replicas fill most, and then, in the way that won, with other model orders while a
    budget of consolidation moves lasts; last, the ILP started from the best of those
    (``_plan_exact``). The plan that places more, then uses fewer GPUs, wins (ties to
    the first, so the result is still a pure function of the input).
    """
    plan, state = _plan_once(snapshot, demands, policy, "largest")
    if not state.optimizes:
        return plan
    variants = []
    if state.scarce:
        variants.append("tight")
    if state.small:
        variants.append("fill")
    best_mode = "largest"
    for mode in variants:
        other, _ = _plan_once(snapshot, demands, policy, mode)
        if _better(other, plan):
            plan, best_mode = other, mode
    if state.small:
        left = PORTFOLIO_MOVES
        for order in alternative_orders(state, not plan.complete)[:PORTFOLIO_ORDERS]:
            if left <= 0:
                break
            other, alt = _plan_once(snapshot, demands, policy, best_mode, order,
                                    min(CONSOLIDATE_MOVES, left))
            left -= alt.moves
            if _better(other, plan):
                plan = other
        exact = _plan_exact(snapshot, demands, policy, plan)
        if exact is not None and _better(exact, plan):
            plan = exact
    return plan


def _plan_exact(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
                start: Plan) -> Optional[Plan]:
    """The plan of the ILP (``ilp``) started from ``start``'s new replicas, within
    ``EXACT_WORK`` (``EXACT_WORK_INCOMPLETE`` when ``start`` leaves replicas unplaced),
    completed by the constructive pass and consolidation; None when more than
    ``EXACT_REPLICAS`` are pending or the model has more variables than allowed, or the
    solver found no plan or ran into the ``EXACT_SECONDS`` guard (a plan that depends on
    the clock is not kept)."""
    state = PlanState(snapshot, demands, policy)
    kept, removals, previous = state.load_existing()
    if not 0 < sum(state.pending.values()) <= EXACT_REPLICAS:
        return None
    limits_of(state, start)
    begun = [Start(state.by_model[a.model], state.by_name[a.node], a.gpus)
             for a in start.assignments if not a.existing]
    work, variables = ((EXACT_WORK, EXACT_VARIABLES) if start.complete
                       else (EXACT_WORK_INCOMPLETE, EXACT_VARIABLES_INCOMPLETE))
    solution = solve_ilp(state, dict(state.pending), time_limit=EXACT_SECONDS,
                         work=work, start=begun, max_variables=variables)
    if solution.status in ("none", "too large", "time limit"):
        return None
    for new in solution.new:
        state.commit(new.demand, state.by_product[new.node.node.product], new.node, new.gpus,
                     new.req)
    # Short of the optimum, the solver's plan may leave room that the constructive pass
    # and consolidation still use.
    for demand in largest_first(state):
        if state.pending[demand.model] > 0:
            place_demand(state, demand)
    state.moves = consolidate(state, CONSOLIDATE_MOVES)
    respread(state)
    return assemble(state, kept, removals, previous, state.placed, _unplaced(state, policy))


def _unplaced(state: PlanState, policy: Policy) -> list[Unplaced]:
    """An entry per replica still pending. Free HBM only shrinks and streamed bytes only
    grow: the reason holds for every replica of the model that is left, said once, on
    the final state."""
    unplaced: list[Unplaced] = []
    for demand in largest_first(state):
        count = state.pending[demand.model]
        if count > 0:
            reason = explain(demand, state.nodes, policy)
            unplaced.extend(Unplaced("", demand.model, reason) for _ in range(count))
    return unplaced


def _better(a: Plan, b: Plan) -> bool:
    """``a`` places more than ``b``, or as many on fewer GPUs (equal: not better)."""
    return (len(a.unplaced), a.gpus_used) < (len(b.unplaced), b.gpus_used)


def _plan_once(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
               mode: str, order: Optional[list[str]] = None,
               moves: Optional[int] = None) -> Attempt:
    """The plan made one way: fresh GPUs valued by ``mode``, models placed in ``order``
    (model names; default largest first), consolidation within ``moves``."""
    state = PlanState(snapshot, demands, policy, mode)
    kept, removals, previous = state.load_existing()
    ranked = (largest_first(state) if order is None
              else [state.by_model[m] for m in order])
    for demand in ranked:
        place_demand(state, demand)
    if state.optimizes and state.small:
        repair(state, [d for d in ranked if state.pending[d.model] > 0])
    if state.optimizes:
        if moves is None:
            moves = CONSOLIDATE_MOVES if state.small else CONSOLIDATE_MOVES_LARGE
        state.moves = consolidate(state, moves)
    respread(state)
    unplaced = _unplaced(state, policy)
    return Attempt(assemble(state, kept, removals, previous, state.placed, unplaced), state)
