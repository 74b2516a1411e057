"""A spreading model's limits within one run (``Demand.spread``, ``state.Apart``).

Every step of a run holds such a model to its limit: a node or GPU at the limit takes
none of its replicas. The limit starts at one replica per node ("node") or GPU ("gpu")
and rises, for that model and that run only, when one of its replicas fits nowhere
within it (``relax``): so replicas share a node or GPU only when every one with room
holds one already, and then the least crowded. When the packing steps have since made
room on a less crowded node or GPU, ``respread`` moves the replicas of this run there,
last.
"""

from __future__ import annotations

from typing import Optional

from kvpilot.operator.placement.model import Demand, Plan
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.reasons import crowding, crowding_tally
from kvpilot.operator.placement.search import best_node, fresh_values
from kvpilot.operator.placement.state import NO_LIMIT, Apart, Placed

RESPREAD_MOVES = 4  # moves per replica of a crowded model, at most, to spread it again


def relax(state: PlanState, demand: Demand) -> bool:
    """Let a spreading model reach further because one of its replicas fits nowhere
    within its limit: raise the limit by one replica per node ("node") or per GPU
    ("gpu") while it binds; once it does not (the products where a replica takes its
    fewest GPUs are full), let its replicas take more GPUs on other products. False
    when nothing is left to relax (it fits nowhere at all). Only this model, in this
    run, reaches further; the reason is kept from the first time
    (``reasons.crowding``).

    Sharing a node comes before a larger tensorParallel: a replica that needs one
    H200 shares a node with another rather than take four L4s.
    """
    apart = state.aparts.get(demand.model)
    if apart is None:
        return False
    model = demand.model
    most_node = max((s.models.get(model, 0) for s in state.nodes), default=0)
    most_gpu = max((c.get(model, 0) for s in state.nodes for c in s.on_gpu), default=0)
    if apart.node_cap is not None and apart.node_cap <= most_node:
        raised = Apart(model, apart.node_cap + 1, apart.gpu_cap)
    elif apart.gpu_cap <= most_gpu:
        raised = Apart(model, apart.node_cap, apart.gpu_cap + 1)
    elif model in state.narrow:
        state.narrow.discard(model)
        return True
    else:
        return False
    if model not in state.crowded:
        state.crowded[model] = crowding(demand, state.nodes, state.policy, apart,
                                        state.fewest_gpus(demand))
    state.aparts[model] = raised
    return True


def limits_of(state: PlanState, plan: Plan) -> None:
    """The spread limits for a run that improves on ``plan`` (the ILP's): a model
    that plan crowds gets none; when the plan leaves replicas unplaced, no model
    gets any (one model kept apart may be what leaves no room for another's replica:
    a replica placed is worth more than replicas apart); else a model keeps its
    limits of one. ``respread`` spreads what the run crowds where there is room,
    last."""
    loose = {c.model for c in plan.crowded}
    if plan.unplaced:
        loose = set(state.aparts)
    for model in loose & set(state.aparts):
        state.aparts[model] = Apart(model, None, NO_LIMIT)
        state.narrow.discard(model)
    # A model the plan placed beyond its fewest GPUs reached further already.
    for a in plan.assignments:
        if a.model in state.narrow and a.tp > (state.fewest_gpus(state.by_model[a.model])
                                               or 0):
            state.narrow.discard(a.model)
    state.crowded.update({c.model: c.reason for c in plan.crowded})


def respread(state: PlanState) -> int:
    """Move this run's replicas of a model whose limit had to rise to a less
    crowded node ("node") or GPU ("gpu") where one has room now: consolidation,
    repair and the ILP move other replicas away and may leave such room. A replica
    on a node (GPU) with c replicas of its model goes to one with at most c - 2 (so
    c - 1 there after), where it takes no more GPUs. At most ``RESPREAD_MOVES``
    moves per replica. Returns the replicas moved."""
    moved = 0
    for demand in state.demands:
        apart = state.aparts.get(demand.model)
        if apart is None or not state.relaxed(demand.model):
            continue
        budget = RESPREAD_MOVES * state.by_model[demand.model].replicas
        for level in ["node" if demand.apart_nodes else "gpu"]:
            changed = True
            while changed and budget > 0:
                changed = False
                mine = [p for p in state.placed if p.demand is demand and p.state is not None]
                mine.sort(key=lambda p: (-_crowding(p, level), p.state.index, p.gpus))
                for p in mine:
                    c = _crowding(p, level)
                    if c < 2:
                        break
                    if level == "node":
                        limit = Apart(demand.model, c - 1, NO_LIMIT)
                    else:
                        limit = Apart(demand.model, None, c - 1)
                    if _move(state, p, limit):
                        moved += 1
                        budget -= 1
                        changed = True
                        break
    return moved


def crowd_reason(state: PlanState, demand: Demand) -> Optional[str]:
    """Why the model's replicas share a node or GPU after this run: why this run had
    to crowd them; else, asked of the final state, that no node or GPU without one
    has room (the same words as when they were placed, so the reason holds still
    from one run to the next), or None when one has (they ran so before)."""
    if demand.model in state.crowded:
        return state.crowded[demand.model]
    strict, fewest = Apart.strict(demand), state.fewest_gpus(demand)
    if crowding_tally(demand, state.nodes, state.policy, strict, fewest)["fits"]:
        return None
    return crowding(demand, state.nodes, state.policy, strict, fewest)


def _crowding(p: Placed, level: str) -> int:
    """Replicas of p's model on p's node ("node"), or on its most crowded GPU."""
    s, model = p.state, p.demand.model
    if level == "node":
        return s.models.get(model, 0)
    return max(s.on_gpu[g].get(model, 0) for g in p.gpus)


def _move(state: PlanState, p: Placed, limit: Apart) -> bool:
    """Move ``p`` to the best node within ``limit`` where it takes no more GPUs than
    now (spreading never raises a tensorParallel), or leave it where it is."""
    s, gpus, req = p.state, p.gpus, p.req
    state.by_product[s.node.product].release(s, p.demand.model, gpus, req)
    options = [o for o in state.options(p.demand) if o.req.tp <= req.tp]
    found = best_node(state, p.demand, options, fresh_values(state, options), apart=limit)
    if found is None:
        state.by_product[s.node.product].update(s, p.demand.model, gpus, req)
        return False
    found.pool.update(found.node, p.demand.model, found.gpus, found.req)
    p.state, p.gpus, p.req = found.node, found.gpus, found.req
    return True
