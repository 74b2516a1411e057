"""The packing objective's own steps: stacking TP groups, completing a fresh GPU,
repairing what is left unplaced, and consolidation.

``stack_groups``: the replicas of a TP model that go onto one node go there together,
over the fewest GPUs the node can give them: shards of one replica need distinct GPUs,
but two replicas may share any of them, so k replicas of TP t fit a set of GPUs that
hold c_g shards each iff the set has t GPUs and sum min(c_g, k) >= t k (McNaughton's
wrap-around deals them out). Three TP-4 replicas of half a GPU take six GPUs, two
shards on each (staggered), not eight; two TP-8 replicas stack on the same eight GPUs
before anything else tops those GPUs up.

``best_fill``: when a replica opens a GPU, the engine completes it at once with the
pending single-GPU replicas that leave the least HBM unused (minimum bin slack, Gupta
and Ho): placing largest-first and best-fit alone leaves holes no later replica fits.

``consolidate``: the constructive pass loses GPUs in leftovers no single replica fits,
and in small GPUs holding what one large GPU could. A ruin-and-recreate search
(Schrimpf et al.) recovers much of it: take this run's replicas off a lightly loaded GPU
(then, if that gains nothing, off it and three others), put them back largest first,
and keep the result when the GPUs it touched end better off (see ``consolidate``);
otherwise undo it.

``repair``: a replica left unplaced although its model fits the fleet is given room by
taking the replicas placed in this run off one node, putting it there, and putting them
back anywhere (any node, any product); kept only when every one of them finds a place.

Only replicas placed in this run move: existing replicas stay put; TP groups move whole.
The search is seeded from the input, so a plan is still a pure function of it.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from typing import TYPE_CHECKING, Optional

from kvpilot.operator.placement.filters import spread_allows
from kvpilot.operator.placement.model import Requirement
from kvpilot.operator.placement.state import Apart, NodeState, Placed, Pool

if TYPE_CHECKING:  # pragma: no cover
    from kvpilot.operator.placement.engine import World

FILL_BUDGET = 400  # search nodes per GPU filled
RUIN = 4  # GPUs emptied per round
PATIENCE = 300  # rounds in a row without improvement before giving up
REPAIR_MOVES = 5_000
HOME_LOOKS = 16  # GPUs in use looked at, tightest first, for a replica that moves  # replicas moved, at most, while repairing one plan


def stack_groups(s: NodeState, req: Requirement, count: int, share: bool,
                 apart: Optional[Apart] = None) -> list[tuple[int, ...]]:
    """GPU sets for as many of ``count`` replicas of ``req`` (TP > 1) as node ``s``
    holds, over the fewest fresh GPUs: GPUs in use first, then fresh ones holding the
    most shards, dealt out by McNaughton's wrap-around; within the model's spread
    limits (``apart``). Empty when not one fits."""
    t = req.tp
    caps = [(g, s.shards(g, req, share, apart)) for g in range(s.node.gpus)]
    caps = [(g, c) for g, c in caps if c > 0]
    if len(caps) < t:
        return []
    k = min(count, s.pods_left, sum(c for _, c in caps) // t)
    if apart is not None:
        k = min(k, apart.node_room(s))
    while k > 0 and sum(min(c, k) for _, c in caps) < t * k:
        k -= 1
    if k == 0:
        return []
    ranked = sorted(caps, key=lambda gc: (s.tenants[gc[0]] == 0, -gc[1], gc[0]))
    slots: list[int] = []
    used = 0
    for g, c in ranked:
        if len(slots) >= t * k and used >= t:
            break
        slots.extend([g] * min(c, k))
        used += 1
    slots = slots[: t * k]
    # Slot j of the row goes to replica j mod k: a GPU's (at most k) slots are
    # consecutive, so no replica gets one GPU twice.
    return [tuple(sorted(slots[j::k])) for j in range(k)]


def repair(world: "World", demands: list, budget: int = REPAIR_MOVES) -> int:
    """Make room for the pending replicas of ``demands`` (in that order) by moving
    replicas placed in this run; returns the moves spent (at most ``budget``)."""
    spent = 0
    for demand in demands:
        while world.pending[demand.model] > 0 and spent < budget:
            moved = _make_room(world, demand, budget - spent)
            if moved is None:
                break
            spent += moved
    return spent


def _make_room(world: "World", demand, budget: int) -> Optional[int]:
    """One replica of ``demand`` placed by emptying one node of this run's replicas
    and putting them back elsewhere; the moves it took, or None (nothing changed)."""
    share = world.policy.share_gpus
    pools = {p.product: p for p in world.pools}
    on_node: dict[int, list[Placed]] = {}
    for p in world.placed:
        if p.state is not None:
            on_node.setdefault(p.state.index, []).append(p)
    tries = []
    apart = world.aparts.get(demand.model)
    for pool, req in world.options(demand):
        for s in pool.states:
            mine = on_node.get(s.index, [])
            if s.node.gpus < req.tp or not mine or len(mine) > budget:
                continue
            tries.append((sum(p.req.hbm_per_gpu * p.req.tp for p in mine), s.index, pool, req))
    for _, n, pool, req in sorted(tries, key=lambda x: (x[0], x[1])):
        s = world.states[n]
        mine = on_node[n]
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
        world.commit(demand, pool, s, stack_groups(s, req, 1, share, apart)[0], req)
        ok = True
        for p in sorted(mine, key=lambda p: (-p.req.hbm_per_gpu * p.req.tp, p.demand.model)):
            fresh = {pl.product: 1.0 for pl in world.pools}
            found = world.best_node(p.demand, world.options(p.demand), fresh)
            # A spreading model's replica that only fits beyond its limits: they rise,
            # as in the constructive pass (the repair is worth more replicas placed).
            while found is None and world.relax(p.demand):
                found = world.best_node(p.demand, world.options(p.demand), fresh)
            if found is None:
                ok = False
                break
            t, gpus_t, pool_t, req_t = found
            pool_t.update(t, p.demand.model, gpus_t, req_t)
            p.state, p.gpus, p.req = t, gpus_t, req_t
        if ok:
            return len(mine)
        # Undo: the new replica off, the moved ones back where they were.
        new = world.placed.pop()
        pools[s.node.product].release(s, demand.model, new.gpus, new.req)
        world.pending[demand.model] += 1
        for p in mine:
            if p.state is not None:
                pools[p.state.node.product].release(p.state, p.demand.model, p.gpus, p.req)
        for p in mine:
            p.state, p.gpus = home[id(p)]
            p.req = p.demand.requirement(p.state.node.product)
            pools[p.state.node.product].update(p.state, p.demand.model, p.gpus, p.req)
    return None


def best_fill(room: int, items: list[tuple[int, int]], budget: int = FILL_BUDGET
              ) -> tuple[int, list[int]]:
    """The most of ``room`` that copies of ``items`` ((size, count), largest first) can
    fill: (bytes filled, how many of each). A bounded depth-first search: sizes in
    decreasing order, most copies first, pruned when the rest cannot beat the best."""
    n = len(items)
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + items[i][0] * items[i][1]
    best = [0, [0] * n]
    take = [0] * n
    visited = 0

    def search(i: int, left: int, filled: int) -> None:
        nonlocal visited
        if filled > best[0]:
            best[0], best[1] = filled, list(take)
        if i == n or left == 0 or visited >= budget:
            return
        if filled + min(left, suffix[i]) <= best[0]:
            return
        visited += 1
        size, count = items[i]
        for k in range(min(count, left // size), -1, -1):
            take[i] = k
            search(i + 1, left - k * size, filled + k * size)
            if best[0] == room or visited >= budget:
                break
        take[i] = 0

    search(0, room, 0)
    return best[0], best[1]


def consolidate(world: "World", budget: int) -> int:
    """Ruin-and-recreate rounds over ``world.placed`` (in place) until a pass over the
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
    pools = {p.product: p for p in world.pools}
    fresh = {p.product: p.states[0].cap / world.max_cap for p in world.pools}
    on_gpu: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(world.placed):
        if p.state is not None:
            for g in p.gpus:
                on_gpu.setdefault((p.state.index, g), []).append(i)
    rng = random.Random(len(world.placed) * 7919 + len(on_gpu))
    spent = [0]
    idle = 0
    while spent[0] < budget:
        # GPUs that only this run's replicas use (those alone can be emptied), least
        # loaded first.
        keys = sorted(
            (k for k, items in on_gpu.items()
             if items and len(items) == world.states[k[0]].tenants[k[1]]),
            key=lambda k: (_load(world.states[k[0]], k[1]), k),
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
            if (_round(world, pools, fresh, on_gpu, [target], spent)
                    or _round(world, pools, fresh, on_gpu, [target] + others[: RUIN - 1],
                              spent)):
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


def _gpu_value(s: NodeState, g: int) -> tuple[int, int, float]:
    """(-1 if in use else 0, its HBM if in use, squared load): summed over GPUs, larger
    is better (see ``consolidate``)."""
    if s.tenants[g] == 0:
        return 0, 0, 0.0
    return -1, s.cap, _load(s, g) ** 2


def _total(values) -> tuple[int, int, float]:
    values = list(values)
    return (sum(v[0] for v in values), sum(v[1] for v in values),
            sum(v[2] for v in values))


def _round(world: "World", pools: dict[str, Pool], fresh: dict[str, float], on_gpu: dict,
           ruined: list, spent: list[int]) -> bool:
    victims = sorted({i for k in ruined for i in on_gpu.get(k, ())})
    if not victims:
        return False
    placed = world.placed
    states = world.states
    # Each GPU the round touches, as it was before the round.
    before: dict[tuple[int, int], tuple[int, int, float]] = {}
    for i in victims:
        s = placed[i].state
        for g in placed[i].gpus:
            before.setdefault((s.index, g), _gpu_value(s, g))
    home = {i: (placed[i].state, placed[i].gpus, placed[i].req) for i in victims}
    for i in victims:
        _take(pools, on_gpu, placed, i)
    spent[0] += len(victims)
    # Largest first: a large replica put back late finds only fragments.
    order = sorted(victims, key=lambda i: (-home[i][2].total, -home[i][2].hbm_per_gpu, i))
    ok = True
    for i in order:
        found = _home(world, placed[i], fresh)
        if found is None:
            ok = False
            break
        s, gpus, req = found
        for g in gpus:  # not touched yet this round: as it was before
            before.setdefault((s.index, g), _gpu_value(s, g))
        _put(pools, on_gpu, placed, i, s, gpus, req)
    if ok:
        was = _total(before.values())
        now = _total(_gpu_value(states[n], g) for n, g in before)
        if now[:2] > was[:2] or (now[:2] == was[:2] and now[2] > was[2] + 1e-9):
            return True
    # Undo: everything that moved goes back where it was.
    for i in victims:
        if placed[i].state is not None:
            _take(pools, on_gpu, placed, i)
    for i in victims:
        s, gpus, req = home[i]
        _put(pools, on_gpu, placed, i, s, gpus, req)
    return False


def _home(world: "World", p: Placed, fresh: dict[str, float]
          ) -> Optional[tuple[NodeState, tuple[int, ...], Requirement]]:
    """Where a replica taken off goes back: where it needs one GPU, the tightest GPU in
    use that holds it (on any allowed product, the fullest after it wins; the index
    finds the tightest by HBM, and where the bandwidth filter refuses it the next few
    are looked at); otherwise, and for TP groups, the engine's own choice
    (``World.best_node``), which opens the fresh GPU of the largest product."""
    share = world.policy.share_gpus
    best: Optional[tuple] = None
    options = world.options(p.demand)
    apart = world.aparts.get(p.demand.model)
    for pool, req in options:
        if req.tp != 1:
            continue
        lst = pool.open_gpus
        start = bisect_left(lst, (req.hbm_per_gpu,))
        for free, n, g in lst[start:start + HOME_LOOKS]:
            s = world.states[n]
            if s.fits(g, req, share, apart) and spread_allows(s, apart) is None:
                key = ((s.cap - free + req.hbm_per_gpu) / s.cap, -n, -g)
                if best is None or key > best[0]:
                    best = (key, s, (g,), req)
                break
    if best is not None:
        return best[1], best[2], best[3]
    found = world.best_node(p.demand, options, fresh)
    return None if found is None else (found[0], found[1], found[3])


def _take(pools: dict[str, Pool], on_gpu: dict, placed: list[Placed], i: int) -> None:
    p = placed[i]
    assert p.state is not None
    pools[p.state.node.product].release(p.state, p.demand.model, p.gpus, p.req)
    for g in p.gpus:
        on_gpu[(p.state.index, g)].remove(i)
    p.state, p.gpus = None, ()


def _put(pools: dict[str, Pool], on_gpu: dict, placed: list[Placed], i: int, s: NodeState,
         gpus: tuple[int, ...], req: Requirement) -> None:
    p = placed[i]
    pools[s.node.product].update(s, p.demand.model, gpus, req)
    for g in gpus:
        on_gpu.setdefault((s.index, g), []).append(i)
    p.state, p.gpus, p.req = s, gpus, req
