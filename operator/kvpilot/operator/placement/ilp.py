"""The placement ILP: the most replicas, then the fewest GPUs with load, exactly.

``place()`` runs it on small fleets as its last improvement step (within a work limit
counted in branch-and-bound nodes, so the plan stays a pure function of the input); the
exact reference (``exact``) runs it without a limit to measure the engine. HiGHS solves
it, through scipy, imported only when a model is solved.

The objective is the one packing is judged on: GPUs that carry any load. First as many
replicas as possible are placed, then, among those placements, the fewest GPUs are used
(one objective, ``GPUs - BIG x placed`` with BIG above the GPU count).

Replicas of one model are interchangeable, so the model counts them per node instead of
naming each (far fewer variables and no symmetry between replicas):

- ``v[m,n]`` integer: replicas of model m on node n;
- ``w[m,n,g]`` integer: of those, how many have a shard on GPU g; ``sum_g w = tp v`` and
  ``w <= v`` (a replica's shards are on distinct GPUs); any such counts can be dealt out
  as whole replicas (McNaughton's wrap-around: walk the GPUs' shards in a row and give
  the k-th shard to replica k mod v);
- ``u[n,g]`` binary: GPU g carries load; ``sum_m need[m,n] w[m,n,g] <= free[n,g] u[n,g]``;
- bandwidth, the second resource: ``y[m,n,g]`` binary, model m has a shard on GPU g
  (``w <= r_m y``); for each model m with an ITL byte budget B_m, ``streamed[n,g] +
  sum_m' step[m'] w[m',n,g] <= B_m + M (1 - y[m,n,g])``: the bytes of all tenants stay
  within the budget of every tenant that has one (and within the budget of the replicas
  already there, a plain row).

Valid inequalities tighten the relaxation: at most j shards larger than 1/(j+1) of a
GPU's free HBM fit on it (``sum w <= j u`` over those, j = 1..3). Symmetry breaking: of
identical GPUs of a node the lower index is used first, and of identical empty nodes
the earlier one carries at least as many used GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.state import NodeState

if TYPE_CHECKING:  # pragma: no cover
    from kvpilot.operator.placement.engine import World

CUTS = (1, 2, 3)
NODES = (50, 1000)  # the fewest and the most branch-and-bound nodes a ``work`` limit gives


@dataclass(frozen=True)
class Solution:
    """``status``: "optimal", "work limit" or "time limit" (the best found within the
    node or time limit) or "none" (no solution found). ``new``: (demand, node, GPUs,
    requirement) of each replica placed. ``bound``: a lower bound on GPUs used when
    every replica is placed, else None."""

    status: str
    new: list[tuple[Demand, NodeState, tuple[int, ...], Requirement]]
    bound: Optional[float]


def solve_world(world: "World", residual: dict[str, int], time_limit: Optional[float] = None,
                work: Optional[int] = None) -> Solution:
    """Solve for ``residual`` replicas per model on ``world``'s states (read, not
    changed), within the limits given. ``work`` bounds branch-and-bound nodes x
    variables (the nodes allowed, ``work`` / variables, kept within ``NODES``): a
    bound on work, so the answer does not depend on the machine, unlike a time limit."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    share = world.policy.share_gpus
    nodes = [s for s in world.states if s.node.schedulable]
    cols_lb: list[float] = []
    cols_ub: list[float] = []
    cost: list[float] = []
    rows: list[tuple[dict[int, float], float, float]] = []

    def var(lb: float, ub: float, c: float) -> int:
        cols_lb.append(lb)
        cols_ub.append(ub)
        cost.append(c)
        return len(cost) - 1

    total_gpus = sum(s.node.gpus for s in world.states)
    big = total_gpus + 1
    u: dict[tuple[int, int], int] = {}
    for s in nodes:
        for g in range(s.node.gpus):
            busy = s.tenants[g] > 0
            u[(s.index, g)] = var(1.0 if busy else 0.0, 1.0, 1.0)
    pairs: list[tuple[Demand, Requirement, NodeState, int, dict[int, int]]] = []
    for d in world.demands:
        r_m = residual[d.model]
        if r_m <= 0:
            continue
        per_model = []
        for s in nodes:
            req = d.requirement(s.node.product)
            if req is None or req.tp > s.node.gpus:
                continue
            gpus = s.fitting_gpus(req, share)
            if len(gpus) < req.tp:
                continue
            v = var(0.0, float(r_m), -float(big))
            w = {g: var(0.0, float(r_m), 0.0) for g in gpus}
            pairs.append((d, req, s, v, w))
            per_model.append(v)
            rows.append(({**{w[g]: 1.0 for g in gpus}, v: -float(req.tp)}, 0.0, 0.0))
            for g in gpus:
                rows.append(({w[g]: 1.0, v: -1.0}, -math.inf, 0.0))
        if per_model:
            rows.append(({v: 1.0 for v in per_model}, -math.inf, float(r_m)))
    # Capacity, valid inequalities, and no sharing, per GPU.
    loads: dict[tuple[int, int], list[tuple[int, int]]] = {}
    streams: dict[tuple[int, int], list[tuple[int, Requirement, int]]] = {}
    for d, req, s, v, w in pairs:
        for g, col in w.items():
            loads.setdefault((s.index, g), []).append((col, req.hbm_per_gpu))
            streams.setdefault((s.index, g), []).append((col, req, residual[d.model]))
    for (n, g), items in streams.items():
        s = world.states[n]
        scale = float(max([s.streamed[g], 1] + [r.step_bytes for _, r, _ in items]))
        most = s.streamed[g] + sum(r.step_bytes * ub for _, r, ub in items)
        limit = s.limit(g)
        if limit is not None and most > limit:
            rows.append(({col: r.step_bytes / scale for col, r, _ in items}, -math.inf,
                         (limit - s.streamed[g]) / scale))
        for col, r, ub in items:
            if r.step_budget is None or most <= r.step_budget:
                continue
            y = var(0.0, 1.0, 0.0)
            rows.append(({col: 1.0, y: -float(ub)}, -math.inf, 0.0))
            big_m = (most - r.step_budget) / scale
            row = {c: rr.step_bytes / scale for c, rr, _ in items}
            row[y] = row.get(y, 0.0) + big_m
            rows.append((row, -math.inf, (r.step_budget - s.streamed[g]) / scale + big_m))
    for (n, g), items in loads.items():
        s = world.states[n]
        free = s.free[g]
        row = {col: need / s.cap for col, need in items}
        if s.tenants[g] == 0:
            row[u[(n, g)]] = -free / s.cap
            rows.append((row, -math.inf, 0.0))
        else:
            rows.append((row, -math.inf, free / s.cap))
        for j in CUTS:
            big_items = [col for col, need in items if need * (j + 1) > free]
            if big_items:
                rows.append(({**{c: 1.0 for c in big_items}, u[(n, g)]: -float(j)},
                             -math.inf, 0.0))
        if not share:
            rows.append(({**{col: 1.0 for col, _ in items}, u[(n, g)]: -1.0}, -math.inf, 0.0))
    # Symmetry breaking.
    for s in nodes:
        for g in range(1, s.node.gpus):
            if (s.free[g], s.tenants[g]) == (s.free[g - 1], s.tenants[g - 1]) and s.tenants[g] == 0:
                rows.append(({u[(s.index, g - 1)]: 1.0, u[(s.index, g)]: -1.0}, 0.0, math.inf))
    groups: dict[tuple[str, int, int], list[NodeState]] = {}
    for s in nodes:
        if not any(s.tenants):
            groups.setdefault((s.node.product, s.node.gpus, s.cap), []).append(s)
    for same in groups.values():
        for a, b in zip(same, same[1:]):
            row = {u[(a.index, g)]: 1.0 for g in range(a.node.gpus)}
            for g in range(b.node.gpus):
                row[u[(b.index, g)]] = -1.0
            rows.append((row, 0.0, math.inf))

    fixed_used = sum(1 for s in world.states if not s.node.schedulable
                     for t in s.tenants if t > 0)
    if not cost:
        return Solution("optimal", [], None)
    n_vars = len(cost)
    data, ri, ci, lo, hi = [], [], [], [], []
    for i, (row, lb, ub) in enumerate(rows):
        for col, val in row.items():
            ri.append(i)
            ci.append(col)
            data.append(val)
        lo.append(lb)
        hi.append(ub)
    constraints = []
    if rows:
        a = coo_matrix((data, (ri, ci)), shape=(len(rows), n_vars)).tocsr()
        constraints.append(LinearConstraint(a, np.array(lo), np.array(hi)))
    options: dict = {"mip_rel_gap": 0.0, "disp": False}
    if time_limit is not None:
        options["time_limit"] = time_limit
    if work is not None:
        options["node_limit"] = min(NODES[1], max(NODES[0], work // n_vars))
    res = milp(c=np.array(cost), integrality=np.ones(n_vars),
               bounds=Bounds(cols_lb, cols_ub), constraints=constraints, options=options)
    if res.x is None:
        return Solution("none", [], None)
    x = np.round(res.x).astype(int)
    new = []
    for d, req, s, v, w in pairs:
        count = int(x[v])
        if count == 0:
            continue
        shards = [g for g in sorted(w) for _ in range(int(x[w[g]]))]
        for k in range(count):
            new.append((d, s, tuple(sorted(shards[k::count])), req))
    bound = None
    if len(new) == sum(max(0, r) for r in residual.values()) and res.mip_dual_bound is not None:
        bound = res.mip_dual_bound + big * len(new) + fixed_used
    if res.status == 0:
        status = "optimal"
    else:  # HiGHS stopped early: at the node limit (work), or on the clock
        status = "time limit" if "time limit" in str(res.message).lower() else "work limit"
    return Solution(status, new, bound)


def lp_bound_world(world: "World", residual: dict[str, int]) -> Optional[float]:
    """A lower bound on GPUs used by any plan that places every ``residual`` replica on
    ``world``, or None when not even the relaxation can place them all.

    Identical GPUs are pooled into classes (dropping "a TP group on one node" and
    bandwidth, which only relaxes it further) and the continuous relaxation is solved
    with the same valid inequalities; it solves in milliseconds at fleet scale.
    """
    import numpy as np
    from scipy.optimize import linprog

    share = world.policy.share_gpus
    # GPU classes: (product, GPUs on its node, free bytes, in use) -> count.
    classes: dict[tuple[str, int, int, bool], int] = {}
    fixed_used = 0
    for s in world.states:
        for g in range(s.node.gpus):
            in_use = s.tenants[g] > 0
            if not s.node.schedulable:
                fixed_used += in_use
                continue
            key = (s.node.product, s.node.gpus, s.free[g], in_use)
            classes[key] = classes.get(key, 0) + 1
    keys = sorted(classes)
    n_u = len(keys)
    cost = [0.0 if k[3] else 1.0 for k in keys]  # GPUs in use count as a constant
    fixed_used += sum(classes[k] for k in keys if k[3])
    bounds = [(0.0, float(classes[k])) for k in keys]
    s_cols: list[tuple[Demand, Requirement, int]] = []
    for d in world.demands:
        if residual[d.model] <= 0:
            continue
        for ci, (product, gpus, free, in_use) in enumerate(keys):
            req = d.requirement(product)
            if req is None or req.tp > gpus or req.hbm_per_gpu > free or (in_use and not share):
                continue
            s_cols.append((d, req, ci))
            cost.append(0.0)
            bounds.append((0.0, None))
    a_ub, b_ub, a_eq, b_eq = [], [], [], []
    width = len(cost)
    for d in world.demands:
        r_m = residual[d.model]
        if r_m <= 0:
            continue
        row = [0.0] * width
        for j, (dd, req, _) in enumerate(s_cols):
            if dd is d:
                row[n_u + j] = 1.0 / req.tp
        if not any(row):
            return None
        a_eq.append(row)
        b_eq.append(float(r_m))
    for ci, (product, gpus, free, in_use) in enumerate(keys):
        mine = [(n_u + j, req) for j, (_, req, c) in enumerate(s_cols) if c == ci]
        if not mine:
            continue
        scale = max(free, 1)
        row = [0.0] * width
        for col, req in mine:
            row[col] = req.hbm_per_gpu / scale
        row[ci] = -free / scale
        a_ub.append(row)
        b_ub.append(0.0)
        for j in CUTS:
            row = [0.0] * width
            for col, req in mine:
                if req.hbm_per_gpu * (j + 1) > free:
                    row[col] = 1.0
            if any(row):
                row[ci] = -float(j)
                a_ub.append(row)
                b_ub.append(0.0)
        if not share:
            row = [0.0] * width
            for col, _ in mine:
                row[col] = 1.0
            row[ci] = -1.0
            a_ub.append(row)
            b_ub.append(0.0)
    if not a_eq:
        return float(fixed_used)
    for ci, k in enumerate(keys):
        if k[3]:
            bounds[ci] = (float(classes[k]), float(classes[k]))
    res = linprog(
        np.array(cost), A_ub=np.array(a_ub) if a_ub else None,
        b_ub=np.array(b_ub) if b_ub else None, A_eq=np.array(a_eq), b_eq=np.array(b_eq),
        bounds=bounds, method="highs",
    )
    if res.status != 0:
        return None
    return float(res.fun) + fixed_used
