"""The packing objective's own steps: completing a fresh GPU, and consolidation.

``best_fill``: when a replica opens a GPU, the engine completes it at once with the
pending single-GPU replicas that leave the least HBM unused (minimum bin slack, Gupta
and Ho): placing largest-first and best-fit alone leaves holes no later replica fits.

``consolidate``: the constructive pass is within a few percent of optimal; the rest is
lost in GPUs whose leftovers no single replica fits. A small ruin-and-recreate search
(Schrimpf et al.) recovers much of it: take the replicas off a lightly loaded GPU and
three others, put them back largest first into the tightest GPU in use that holds them
(any allowed product), opening the just-emptied GPU they fill most only when nothing in
use fits, and keep the result when it leaves fewer GPUs in use, or as many with load
more concentrated (a larger sum of squared loads over every GPU the round touched, the
ruined ones and those that took their replicas: the next GPU is easier to empty);
otherwise undo it.

Only single-GPU replicas placed in this run move: existing replicas stay put and TP
groups keep their GPUs. The search is seeded from the input, so a plan is still a pure
function of it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

from kvpilot.operator.placement.state import NodeState, Pool

if TYPE_CHECKING:  # pragma: no cover
    from kvpilot.operator.placement.engine import World

FILL_BUDGET = 400  # search nodes per GPU filled
RUIN = 4  # GPUs emptied per round
PATIENCE = 300  # rounds in a row without improvement before giving up


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
    replica moves are spent; returns the moves spent. The budget counts
    work, not time, so the result does not depend on the machine."""
    pools = {p.product: p for p in world.pools}
    on_gpu: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(world.placed):
        if len(item[2]) == 1:
            on_gpu.setdefault((item[1].index, item[2][0]), []).append(i)
    rng = random.Random(len(world.placed) * 7919 + len(on_gpu))
    spent = [0]
    idle = 0
    while spent[0] < budget:
        keys = sorted(
            (k for k, items in on_gpu.items() if items),
            key=lambda k: (world.states[k[0]].cap - world.states[k[0]].free[k[1]], k),
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
            ruined = [target] + others[: RUIN - 1]
            if _round(world, pools, on_gpu, ruined, spent):
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


def _round(world: "World", pools: dict[str, Pool], on_gpu: dict, ruined: list,
           spent: list[int]) -> bool:
    states = world.states
    before = {k: _load(states[k[0]], k[1]) for k in ruined}
    moved: list[tuple[int, tuple[int, int]]] = []  # (item, where it was)
    for key in ruined:
        for i in list(on_gpu.get(key, ())):
            _take(world, pools, on_gpu, i)
            moved.append((i, key))
    spent[0] += len(moved)
    emptied = [k for k in ruined if states[k[0]].tenants[k[1]] == 0]
    order = sorted(moved, key=lambda m: (-world.placed[m[0]][3].hbm_per_gpu, m[0]))
    ok = True
    for i, _ in order:
        where = _best_home(world, pools, i, emptied)
        if where is None:
            ok = False
            break
        key = (where[0].index, where[1])
        if key not in before:
            before[key] = _load(where[0], where[1])
        _put(world, pools, on_gpu, i, *where)
    if ok:
        still_empty = sum(1 for n, g in emptied if states[n].tenants[g] == 0)
        gain = sum(_load(states[n], g) ** 2 - b * b for (n, g), b in before.items())
        if still_empty > 0 or gain > 1e-9:
            return True
    # Undo: everything that moved goes back where it was.
    for i, _ in moved:
        if world.placed[i][1] is not None:
            _take(world, pools, on_gpu, i)
    for i, (n, g) in moved:
        s = states[n]
        req = world.placed[i][0].requirement(s.node.product)
        _put(world, pools, on_gpu, i, s, g, req)
    return False


def _take(world: "World", pools: dict[str, Pool], on_gpu: dict, i: int) -> None:
    demand, s, gpus, req = world.placed[i]
    pools[s.node.product].release(s, demand.model, gpus, req.hbm_per_gpu)
    on_gpu[(s.index, gpus[0])].remove(i)
    world.placed[i] = [demand, None, (), req]


def _put(world: "World", pools: dict[str, Pool], on_gpu: dict, i: int, s: NodeState, g: int,
         req) -> None:
    demand = world.placed[i][0]
    pools[s.node.product].update(s, demand.model, (g,), req.hbm_per_gpu)
    on_gpu.setdefault((s.index, g), []).append(i)
    world.placed[i] = [demand, s, (g,), req]


def _best_home(world: "World", pools: dict[str, Pool], i: int, emptied: list
               ) -> Optional[tuple[NodeState, int, object]]:
    """The tightest in-use GPU that holds item ``i`` (on any product where it needs one
    GPU), else the just-emptied GPU it fills most: a replica that takes 99% of an H100
    goes there rather than leaving 40% of an H200 to fragments."""
    demand = world.placed[i][0]
    best: Optional[tuple] = None
    for pool in world.pools:
        req = demand.requirement(pool.product)
        if req is None or req.tp != 1:
            continue
        hit = pool.best_open_gpu(req.hbm_per_gpu)
        if hit is None:
            continue
        free, n, g = hit
        s = world.states[n]
        fill = (s.cap - free + req.hbm_per_gpu) / s.cap
        if best is None or (fill, -n, -g) > best[0]:
            best = ((fill, -n, -g), s, g, req)
    if best is not None:
        return best[1], best[2], best[3]
    fresh: Optional[tuple] = None
    for n, g in emptied:
        s = world.states[n]
        req = demand.requirement(s.node.product)
        if s.tenants[g] == 0 and req is not None and req.tp == 1 and s.free[g] >= req.hbm_per_gpu:
            key = (req.hbm_per_gpu / s.cap, -n, -g)
            if fresh is None or key > fresh[0]:
                fresh = (key, s, g, req)
    return None if fresh is None else (fresh[1], fresh[2], fresh[3])
