"""The constructive pass: a model's pending replicas placed one best node at a time
(``search.best_node``). When the policy optimizes, the replicas of a TP model that go
onto one node go there together (``packing.stack_groups``), and a GPU that a replica
opens is completed at once with the pending replicas that fill it best
(``packing.best_fill``)."""

from __future__ import annotations

from kvpilot.operator.placement.filters import spread_allows
from kvpilot.operator.placement.model import Demand
from kvpilot.operator.placement.packing import best_fill, stack_groups
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.search import ScoreCache, best_node, fresh_values
from kvpilot.operator.placement.spread import relax
from kvpilot.operator.placement.state import NodeState, Pool


def place_demand(state: PlanState, demand: Demand) -> bool:
    """Place the model's pending replicas; False when one fits nowhere (it and the
    rest stay pending: free HBM only shrinks, so none of them would fit either)."""
    options = state.options(demand)
    cache: ScoreCache = {}
    fresh = fresh_values(state, options)
    share = state.policy.share_gpus
    while state.pending[demand.model] > 0:
        best = best_node(state, demand, options, fresh, cache)
        if best is None:
            if not relax(state, demand):
                return False
            cache.clear()  # scores were of the limits before
            options = state.options(demand)
            fresh = fresh_values(state, options)
            continue
        s, gpus, pool, req = best
        sets = [gpus]
        # Several replicas on one node, sharing GPUs: not for a model that spreads.
        if (state.optimizes and req.tp > 1 and state.pending[demand.model] > 1
                and not demand.spreads):
            sets = stack_groups(s, req, state.pending[demand.model], share) or sets
        opened = sorted({g for group in sets for g in group if s.tenants[g] == 0})
        for group in sets:
            state.commit(demand, pool, s, group, req)
        if state.optimizes:
            for g in opened:
                fill_gpu(state, pool, s, g)
    return True


def fill_gpu(state: PlanState, pool: Pool, s: NodeState, g: int) -> None:
    """Complete a GPU that a replica has just opened with the pending single-GPU
    replicas that leave the least HBM unused (minimum bin slack, Gupta and Ho).

    Placing largest-first and best-fit alone leaves holes that no later replica fits;
    choosing a GPU's whole content at once avoids most of them. The choice is made on
    HBM; a replica the bandwidth filter then refuses is left pending.
    """
    items = state.fill_items(pool.product, s.free[g])
    if not items:
        return
    counts = [state.room(it.demand, s, g, it.pending) for it in items]
    _, counts = best_fill(s.free[g], [(it.need, count) for it, count in zip(items, counts)])
    share = state.policy.share_gpus
    for it, k in zip(items, counts):
        apart = state.aparts.get(it.demand.model)
        for _ in range(k):
            if not s.fits(g, it.req, share, apart) or spread_allows(s, apart) is not None:
                break
            state.commit(it.demand, pool, s, (g,), it.req)
