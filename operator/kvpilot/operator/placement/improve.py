"""The packing objective's improvements over a finished constructive pass: repairing
what is left unplaced, and consolidation.

``repair``: a replica left unplaced although its model fits the fleet is given room by
taking the replicas placed in this run off one node, putting it there, and putting them
back anywhere (any node, any product); kept only when every one of them finds a place.

``consolidate``: the constructive pass loses GPUs in leftovers no single replica fits,
and in small GPUs holding what one large GPU could. A ruin-and-recreate search
(Schrimpf et al.) recovers much of it: take this run's replicas off a lightly loaded GPU
(then, if that gains nothing, off it and three others), put them back largest first,
and keep the result when the GPUs it touched end better off (see ``consolidate``);
otherwise undo it.

Only replicas placed in this run move: existing replicas stay put; TP groups move whole.
The search is seeded from the input, so a plan is still a pure function of it.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from typing import NamedTuple, Optional

from kvpilot.operator.placement.filters import spread_allows
from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.packing import stack_groups
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.search import Found, best_node
from kvpilot.operator.placement.spread import relax
from kvpilot.operator.placement.state import NodeState, Placed, Pool

RUIN = 4  # GPUs emptied per round
PATIENCE = 300  # rounds in a row without improvement before giving up
REPAIR_MOVES = 5_000  # replicas moved, at most, while repairing one plan
HOME_LOOKS = 16  # GPUs in use looked at, tightest first, for a replica that moves

GpuKey = tuple[int, int]  # (node index, GPU)


def repair(state: PlanState, demands: list[Demand], budget: int = REPAIR_MOVES) -> int:
    """Make room for the pending replicas of ``demands`` (in that order) by moving
    replicas placed in this run; returns the moves spent (at most ``budget``)."""
    spent = 0
    for demand in demands:
        while state.pending[demand.model] > 0 and spent < budget:
            moved = _make_room(state, demand, budget - spent)
            if moved is None:
                break
            spent += moved
    return spent


class _Try(NamedTuple):
    """A node that repair may empty for a replica: what this run placed on it weighs
    ``load`` (HBM over all GPUs); the replica would need ``req`` there."""

    load: int
    node_index: int
    pool: Pool
    req: Requirement


def _make_room(state: PlanState, demand: Demand, budget: int) -> Optional[int]:
    """One replica of ``demand`` placed by emptying one node of this run's replicas
    and putting them back elsewhere; the moves it took, or None (nothing changed)."""
    share = state.policy.share_gpus
    pools = state.by_product
    on_node: dict[int, list[Placed]] = {}
    for p in state.placed:
        if p.state is not None:
            on_node.setdefault(p.state.index, []).append(p)
    tries = []
    apart = state.aparts.get(demand.model)
    for pool, req in state.options(demand):
        for s in pool.states:
            mine = on_node.get(s.index, [])
            if s.node.gpus < req.tp or not mine or len(mine) > budget:
                continue
            tries.append(_Try(sum(p.req.hbm_per_gpu * p.req.tp for p in mine), s.index, pool,
                              req))
    for t in sorted(tries, key=lambda t: (t.load, t.node_index)):
        pool, req = t.pool, t.req
        s = state.nodes[t.node_index]
        mine = on_node[t.node_index]
        for p in mine:
            pools[s.node.product].release(s, p.demand.model, p.gpus, p.req)
        gpus = s.fitting_gpus(req, share, apart)
        if len(gpus) < req.tp or spread_allows(s, apart) is not None:
            for p in mine:
                pools[s.node.product].update(s, p.demand.model, p.gpus, p.req)
            continue
        home = {id(p): (p.state, p.gpus) for p in mine}
        for p in mine:
            p.state = None
        state.commit(demand, pool, s, stack_groups(s, req, 1, share, apart)[0], req)
        ok = True
        for p in sorted(mine, key=lambda p: (-p.req.hbm_per_gpu * p.req.tp, p.demand.model)):
            fresh = {pl.product: 1.0 for pl in state.pools}
            found = best_node(state, p.demand, state.options(p.demand), fresh)
            # A spreading model's replica that only fits beyond its limits: they rise,
            # as in the constructive pass (the repair is worth more replicas placed).
            while found is None and relax(state, p.demand):
                found = best_node(state, p.demand, state.options(p.demand), fresh)
            if found is None:
                ok = False
                break
            found.pool.update(found.node, p.demand.model, found.gpus, found.req)
            p.state, p.gpus, p.req = found.node, found.gpus, found.req
        if ok:
            return len(mine)
        # Undo: the new replica off, the moved ones back where they were.
        new = state.placed.pop()
        pools[s.node.product].release(s, demand.model, new.gpus, new.req)
        state.pending[demand.model] += 1
        for p in mine:
            if p.state is not None:
                pools[p.state.node.product].release(p.state, p.demand.model, p.gpus, p.req)
        for p in mine:
            p.state, p.gpus = home[id(p)]
            p.req = p.demand.requirement(p.state.node.product)
            pools[p.state.node.product].update(p.state, p.demand.model, p.gpus, p.req)
    return None


def consolidate(state: PlanState, budget: int) -> int:
    """Ruin-and-recreate rounds over ``state.placed`` (in place) until a pass over the
    GPUs improves nothing, ``PATIENCE`` rounds in a row improve nothing, or ``budget``
    replica moves are spent; returns the moves spent. The budget counts work, not time,
    so the result does not depend on the machine.

    A round takes every replica of this run off a lightly loaded GPU, or off it and
    ``RUIN - 1`` others when that alone gains nothing (a TP group leaves all its GPUs),
    and puts them back largest first (``_home``: the tightest GPU in use that holds a
    single-GPU replica, else the engine's own choice, which opens the fresh GPU of the
    largest product). It is kept when the GPUs it touched end with fewer in use, or as
    many holding more HBM, or as many with load more concentrated (a larger sum of
    squared loads: the next GPU is easier to empty), in that order. The second lets
    replicas leave small GPUs for a large one at no cost in GPUs, after which the large
    one absorbs the next small GPU's replicas and frees it.
    """
    fresh = {p.product: p.states[0].cap / state.max_cap for p in state.pools}
    # (node, GPU) -> positions in ``state.placed`` of this run's replicas on it
    on_gpu: dict[GpuKey, list[int]] = {}
    for i, p in enumerate(state.placed):
        if p.state is not None:
            for g in p.gpus:
                on_gpu.setdefault((p.state.index, g), []).append(i)
    rng = random.Random(len(state.placed) * 7919 + len(on_gpu))
    spent = [0]
    idle = 0
    nodes = state.nodes
    while spent[0] < budget:
        # GPUs that only this run's replicas use (those alone can be emptied), least
        # loaded first.
        keys = sorted(
            (k for k, items in on_gpu.items()
             if items and len(items) == nodes[k[0]].tenants[k[1]]),
            key=lambda k: (_load(nodes[k[0]], k[1]), k),
        )
        if len(keys) < 2:
            return spent[0]
        improved = False
        for target in keys:
            if spent[0] >= budget:
                return spent[0]
            if not on_gpu.get(target):
                continue
            others = [k for k in rng.sample(keys, min(len(keys), RUIN)) if k != target]
            # The GPU alone first (its replicas onto GPUs in use, or onto one larger
            # fresh GPU), then with others.
            if (_round(state, fresh, on_gpu, [target], spent)
                    or _round(state, fresh, on_gpu, [target] + others[: RUIN - 1], spent)):
                improved = True
                idle = 0
            else:
                idle += 1
                if idle >= PATIENCE:
                    return spent[0]
        if not improved:
            return spent[0]
    return spent[0]


def _load(s: NodeState, g: int) -> float:
    return (s.cap - s.free[g]) / s.cap


class GpuValue(NamedTuple):
    """What a GPU is worth to consolidation; summed over GPUs, larger is better, in
    this order (see ``consolidate``)."""

    in_use: int  # -1 if in use, else 0
    hbm: int  # its HBM if in use, else 0
    squared_load: float


def _gpu_value(s: NodeState, g: int) -> GpuValue:
    if s.tenants[g] == 0:
        return GpuValue(0, 0, 0.0)
    return GpuValue(-1, s.cap, _load(s, g) ** 2)


def _total(values) -> GpuValue:
    values = list(values)
    return GpuValue(sum(v.in_use for v in values), sum(v.hbm for v in values),
                    sum(v.squared_load for v in values))


class _Spot(NamedTuple):
    """Where a replica was before a round took it off."""

    node: NodeState
    gpus: tuple[int, ...]
    req: Requirement


def _round(state: PlanState, fresh: dict[str, float], on_gpu: dict[GpuKey, list[int]],
           ruined: list[GpuKey], spent: list[int]) -> bool:
    """One ruin-and-recreate round over the GPUs ``ruined``; True when it is kept
    (else it is undone). ``spent[0]`` counts the replicas it moves."""
    victims = sorted({i for k in ruined for i in on_gpu.get(k, ())})
    if not victims:
        return False
    placed = state.placed
    nodes = state.nodes
    pools = state.by_product
    # Each GPU the round touches, as it was before the round.
    before: dict[GpuKey, GpuValue] = {}
    for i in victims:
        s = placed[i].state
        for g in placed[i].gpus:
            before.setdefault((s.index, g), _gpu_value(s, g))
    home = {i: _Spot(placed[i].state, placed[i].gpus, placed[i].req) for i in victims}
    for i in victims:
        _take(pools, on_gpu, placed, i)
    spent[0] += len(victims)
    # Largest first: a large replica put back late finds only fragments.
    order = sorted(victims, key=lambda i: (-home[i].req.total, -home[i].req.hbm_per_gpu, i))
    ok = True
    for i in order:
        found = _home(state, placed[i], fresh)
        if found is None:
            ok = False
            break
        for g in found.gpus:  # not touched yet this round: as it was before
            before.setdefault((found.node.index, g), _gpu_value(found.node, g))
        _put(pools, on_gpu, placed, i, found.node, found.gpus, found.req)
    if ok:
        was = _total(before.values())
        now = _total(_gpu_value(nodes[n], g) for n, g in before)
        if now[:2] > was[:2] or (now[:2] == was[:2]
                                 and now.squared_load > was.squared_load + 1e-9):
            return True
    # Undo: everything that moved goes back where it was.
    for i in victims:
        if placed[i].state is not None:
            _take(pools, on_gpu, placed, i)
    for i in victims:
        s, gpus, req = home[i]
        _put(pools, on_gpu, placed, i, s, gpus, req)
    return False


def _home(state: PlanState, p: Placed, fresh: dict[str, float]) -> Optional[Found]:
    """Where a replica taken off goes back: where it needs one GPU, the tightest GPU in
    use that holds it (on any allowed product, the fullest after it wins; the index
    finds the tightest by HBM, and where the bandwidth filter refuses it the next few
    are looked at); otherwise, and for TP groups, the engine's own choice
    (``search.best_node``), which opens the fresh GPU of the largest product."""
    share = state.policy.share_gpus
    best: Optional[Found] = None
    best_key: Optional[tuple[float, int, int]] = None
    options = state.options(p.demand)
    apart = state.aparts.get(p.demand.model)
    for pool, req in options:
        if req.tp != 1:
            continue
        lst = pool.open_gpus
        start = bisect_left(lst, (req.hbm_per_gpu,))
        for free, n, g in lst[start:start + HOME_LOOKS]:
            s = state.nodes[n]
            if s.fits(g, req, share, apart) and spread_allows(s, apart) is None:
                key = ((s.cap - free + req.hbm_per_gpu) / s.cap, -n, -g)
                if best_key is None or key > best_key:
                    best, best_key = Found(s, (g,), pool, req), key
                break
    if best is not None:
        return best
    return best_node(state, p.demand, options, fresh)


def _take(pools: dict[str, Pool], on_gpu: dict[GpuKey, list[int]], placed: list[Placed],
          i: int) -> None:
    p = placed[i]
    assert p.state is not None
    pools[p.state.node.product].release(p.state, p.demand.model, p.gpus, p.req)
    for g in p.gpus:
        on_gpu[(p.state.index, g)].remove(i)
    p.state, p.gpus = None, ()


def _put(pools: dict[str, Pool], on_gpu: dict[GpuKey, list[int]], placed: list[Placed], i: int,
         s: NodeState, gpus: tuple[int, ...], req: Requirement) -> None:
    p = placed[i]
    pools[s.node.product].update(s, p.demand.model, gpus, req)
    for g in gpus:
        on_gpu.setdefault((s.index, g), []).append(i)
    p.state, p.gpus, p.req = s, gpus, req
