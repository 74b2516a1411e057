"""The placement ILP: the most replicas, then the fewest GPUs with load, exactly.

``place()`` runs it on small fleets as its last improvement step (within a work limit
counted in branch-and-bound nodes, so the plan stays a pure function of the input); the
exact reference (``exact``) runs it without a limit to measure the engine. HiGHS solves
it (highspy, imported only when a model is solved).

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
the earlier one carries at least as many used GPUs. A node's pod limit is a row over
its ``v``. A model that spreads (``state.Apart``) bounds its variables: ``v[m,n]`` by
what its node limit leaves on n, ``w[m,n,g]`` by what its GPU limit leaves on g, and a
node or GPU at the limit gets no variable at all.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.state import NodeState

CUTS = (1, 2, 3)
NODES = (50, 1000)  # the fewest and the most branch-and-bound nodes a ``work`` limit gives


class Start(NamedTuple):
    """A replica of a start (an incumbent for the search): where it is."""

    demand: Demand
    node: NodeState
    gpus: tuple[int, ...]


class NewReplica(NamedTuple):
    """A replica the solution places."""

    demand: Demand
    node: NodeState
    gpus: tuple[int, ...]
    req: Requirement


class Row(NamedTuple):
    """A constraint: ``low <= sum(coef x[col] for col, coef in coefs) <= high``."""

    coefs: dict[int, float]
    low: float
    high: float


class _Pair(NamedTuple):
    """The columns of one (model, node) pair: ``v``, replicas of the model on the node;
    ``w``, GPU -> how many of them have a shard on it."""

    demand: Demand
    req: Requirement
    node: NodeState
    v: int
    w: dict[int, int]


@dataclass(frozen=True)
class Solution:
    """``status``: "optimal", "work limit" or "time limit" (the best found within the
    node or time limit), "none" (no solution found) or "too large" (not solved).
    ``new``: each replica placed. ``bound``: a lower bound on GPUs used when every
    replica is placed, else None."""

    status: str
    new: list[NewReplica]
    bound: Optional[float]


def solve_ilp(state: PlanState, residual: dict[str, int], time_limit: Optional[float] = None,
              work: Optional[int] = None, start: Sequence[Start] = (),
              max_variables: Optional[int] = None) -> Solution:
    """Solve for ``residual`` replicas per model on ``state``'s nodes (read, not
    changed), within the limits given. ``work`` bounds branch-and-bound nodes x
    variables (the nodes allowed, ``work`` / variables, kept within ``NODES``): a
    bound on work, so the answer does not depend on the machine, unlike a time limit.
    ``start``, a feasible placement of (some of) the replicas, is the incumbent the search starts from: the answer is never worse than it. A model
    of more than ``max_variables`` is not solved (status "too large")."""
    share = state.policy.share_gpus
    nodes = [s for s in state.nodes if s.node.schedulable]
    cols_lb: list[float] = []
    cols_ub: list[float] = []
    cost: list[float] = []
    rows: list[Row] = []

    def var(lb: float, ub: float, c: float) -> int:
        cols_lb.append(lb)
        cols_ub.append(ub)
        cost.append(c)
        return len(cost) - 1

    total_gpus = sum(s.node.gpus for s in state.nodes)
    big = total_gpus + 1
    u: dict[tuple[int, int], int] = {}
    for s in nodes:
        for g in range(s.node.gpus):
            busy = s.tenants[g] > 0
            u[(s.index, g)] = var(1.0 if busy else 0.0, 1.0, 1.0)
    pairs: list[_Pair] = []
    on_node: dict[int, list[int]] = {}  # node -> its v columns
    for d in state.demands:
        r_m = residual[d.model]
        if r_m <= 0:
            continue
        per_model = []
        apart = state.aparts.get(d.model)
        products = {pool.product for pool, _ in state.options(d)}
        for s in nodes:
            req = d.requirement(s.node.product)
            if req is None or req.tp > s.node.gpus or s.node.product not in products:
                continue
            gpus = s.fitting_gpus(req, share, apart)
            if len(gpus) < req.tp or (apart is not None and not apart.node_allows(s)):
                continue
            most = r_m if apart is None else min(r_m, apart.node_room(s))
            v = var(0.0, float(most), -float(big))
            w = {g: var(0.0, float(most if apart is None else min(most, apart.gpu_room(s, g))),
                        0.0) for g in gpus}
            pairs.append(_Pair(d, req, s, v, w))
            per_model.append(v)
            on_node.setdefault(s.index, []).append(v)
            rows.append(Row({**{w[g]: 1.0 for g in gpus}, v: -float(req.tp)}, 0.0, 0.0))
            for g in gpus:
                rows.append(Row({w[g]: 1.0, v: -1.0}, -math.inf, 0.0))
        if per_model:
            rows.append(Row({v: 1.0 for v in per_model}, -math.inf, float(r_m)))
    for n, mine in on_node.items():  # the node's pod limit
        s = state.nodes[n]
        if s.node.max_pods is not None:
            rows.append(Row({v: 1.0 for v in mine}, -math.inf, float(max(0, s.pods_left))))
    # Capacity, valid inequalities, and no sharing, per GPU.
    present: list[tuple[int, int]] = []  # (w, y): y = 1 when w > 0
    loads: dict[tuple[int, int], list[tuple[int, int]]] = {}
    streams: dict[tuple[int, int], list[tuple[int, Requirement, int]]] = {}
    for d, req, s, v, w in pairs:
        for g, col in w.items():
            loads.setdefault((s.index, g), []).append((col, req.hbm_per_gpu))
            streams.setdefault((s.index, g), []).append((col, req, residual[d.model]))
    for (n, g), items in streams.items():
        s = state.nodes[n]
        scale = float(max([s.streamed[g], 1] + [r.step_bytes for _, r, _ in items]))
        most = s.streamed[g] + sum(r.step_bytes * ub for _, r, ub in items)
        limit = s.limit(g)
        if limit is not None and most > limit:
            rows.append(Row({col: r.step_bytes / scale for col, r, _ in items}, -math.inf,
                            (limit - s.streamed[g]) / scale))
        for col, r, ub in items:
            if r.step_budget is None or most <= r.step_budget:
                continue
            y = var(0.0, 1.0, 0.0)
            present.append((col, y))
            rows.append(Row({col: 1.0, y: -float(ub)}, -math.inf, 0.0))
            big_m = (most - r.step_budget) / scale
            row = {c: rr.step_bytes / scale for c, rr, _ in items}
            row[y] = row.get(y, 0.0) + big_m
            rows.append(Row(row, -math.inf, (r.step_budget - s.streamed[g]) / scale + big_m))
    for (n, g), items in loads.items():
        s = state.nodes[n]
        free = s.free[g]
        row = {col: need / s.cap for col, need in items}
        if s.tenants[g] == 0:
            row[u[(n, g)]] = -free / s.cap
            rows.append(Row(row, -math.inf, 0.0))
        else:
            rows.append(Row(row, -math.inf, free / s.cap))
        for j in CUTS:
            big_items = [col for col, need in items if need * (j + 1) > free]
            if big_items:
                rows.append(Row({**{c: 1.0 for c in big_items}, u[(n, g)]: -float(j)},
                                -math.inf, 0.0))
        if not share:
            rows.append(Row({**{col: 1.0 for col, _ in items}, u[(n, g)]: -1.0},
                            -math.inf, 0.0))
    if not start:  # symmetry breaking: a start need not be in the chosen order
        rows.extend(_symmetry_rows(nodes, u))

    fixed_used = sum(1 for s in state.nodes if not s.node.schedulable
                     for t in s.tenants if t > 0)
    if not cost:
        return Solution("optimal", [], None)
    if max_variables is not None and len(cost) > max_variables:
        return Solution("too large", [], None)
    x0 = _start_values(cols_lb, u, pairs, present, start) if start else None
    x, status, dual = _run(cost, cols_lb, cols_ub, rows, x0, time_limit, work)
    if x is None:
        return Solution("none", [], None)
    new = []
    for d, req, s, v, w in pairs:
        count = int(round(x[v]))
        if count == 0:
            continue
        shards = [g for g in sorted(w) for _ in range(int(round(x[w[g]])))]
        for k in range(count):
            new.append(NewReplica(d, s, tuple(sorted(shards[k::count])), req))
    bound = None
    if len(new) == sum(max(0, r) for r in residual.values()) and dual is not None:
        bound = dual + big * len(new) + fixed_used
    return Solution(status, new, bound)


def _symmetry_rows(nodes: list[NodeState], u: dict[tuple[int, int], int]) -> list[Row]:
    """Of identical fresh GPUs of a node the lower index is used first; of identical
    empty nodes the earlier one carries at least as many used GPUs."""
    rows = []
    for s in nodes:
        for g in range(1, s.node.gpus):
            if (s.free[g], s.tenants[g]) == (s.free[g - 1], s.tenants[g - 1]) and s.tenants[g] == 0:
                rows.append(Row({u[(s.index, g - 1)]: 1.0, u[(s.index, g)]: -1.0}, 0.0,
                                math.inf))
    groups: dict[tuple[str, int, int], list[NodeState]] = {}
    for s in nodes:
        if not any(s.tenants):
            groups.setdefault((s.node.product, s.node.gpus, s.cap), []).append(s)
    for same in groups.values():
        for a, b in zip(same, same[1:]):
            row = {u[(a.index, g)]: 1.0 for g in range(a.node.gpus)}
            for g in range(b.node.gpus):
                row[u[(b.index, g)]] = -1.0
            rows.append(Row(row, 0.0, math.inf))
    return rows


def _start_values(lower: list[float], u: dict[tuple[int, int], int], pairs: list[_Pair],
                  present: list[tuple[int, int]], start: Sequence[Start]) -> list[float]:
    """The variables' values for the placement ``start`` (GPUs in use before it are in
    use: their lower bound is 1)."""
    x = list(lower)
    col = {(p.demand.model, p.node.index): p for p in pairs}
    for d, s, gpus in start:
        pair = col[(d.model, s.index)]
        v, w = pair.v, pair.w
        x[v] += 1
        for g in gpus:
            x[w[g]] += 1
            x[u[(s.index, g)]] = 1.0
    for w_col, y_col in present:
        x[y_col] = 1.0 if x[w_col] > 0 else 0.0
    return x


def _run(cost: list[float], lb: list[float], ub: list[float],
         rows: list[Row], x0: Optional[list[float]],
         time_limit: Optional[float], work: Optional[int]
         ) -> tuple[Optional[list[float]], str, Optional[float]]:
    """(values, status, dual bound) of the ILP; values None when no solution was found."""
    import highspy

    h = _highs(cost, lb, ub, rows, integer=True)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    if work is not None:
        h.setOptionValue("mip_max_nodes", min(NODES[1], max(NODES[0], work // len(cost))))
    if x0 is not None:
        sol = highspy.HighsSolution()
        sol.col_value = x0
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    model_status = h.getModelStatus()
    info = h.getInfo()
    if info.primal_solution_status != 2:  # no feasible solution
        return None, "none", None
    if model_status == highspy.HighsModelStatus.kOptimal:
        status = "optimal"
    elif model_status == highspy.HighsModelStatus.kTimeLimit:
        status = "time limit"
    else:  # the node limit: work
        status = "work limit"
    dual = info.mip_dual_bound
    return list(h.getSolution().col_value), status, (None if math.isinf(dual) else dual)


_banner_shown = False


def _highs(cost: list[float], lower: list[float], upper: list[float],
           rows: list[Row], integer: bool):
    """A silent HiGHS instance holding the model: minimise cost x subject to
    lower <= x <= upper and, per row (coefficients by column, low, high), low <= a x <=
    high; x integer when ``integer``."""
    import highspy
    import numpy as np

    global _banner_shown
    if _banner_shown:
        h = highspy.Highs()
    else:
        # HiGHS prints a banner to standard output when the first instance of a process
        # is made, before any option can turn it off; ``kvpilot plan -o json`` writes
        # its plan there. Standard output is pointed at /dev/null for that moment.
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _banner_shown = True
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    lp = highspy.HighsLp()
    lp.num_col_ = len(cost)
    lp.num_row_ = len(rows)
    lp.col_cost_ = np.array(cost, dtype=float)
    lp.col_lower_ = np.array(lower, dtype=float)
    lp.col_upper_ = np.array(upper, dtype=float)
    lp.row_lower_ = np.array([r.low for r in rows], dtype=float)
    lp.row_upper_ = np.array([r.high for r in rows], dtype=float)
    starts, index, value = [0], [], []
    for row, _, _ in rows:
        for c in sorted(row):
            index.append(c)
            value.append(row[c])
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=float)
    if integer:
        lp.integrality_ = [highspy.HighsVarType.kInteger] * len(cost)
    h.passModel(lp)
    return h


class _GpuClass(NamedTuple):
    """Identical GPUs, for the relaxation: their product, GPUs on their node, free
    bytes, and whether they are in use."""

    product: str
    gpus: int
    free: int
    in_use: bool


class _ClassColumn(NamedTuple):
    """The column of shards of one model on one GPU class (an index into the sorted
    classes)."""

    demand: Demand
    req: Requirement
    klass: int
    col: int


def relaxation_bound(state: PlanState, residual: dict[str, int]) -> Optional[float]:
    """A lower bound on GPUs used by any plan that places every ``residual`` replica on
    ``state``'s nodes, or None when not even the relaxation can place them all.

    Identical GPUs are pooled into classes (dropping "a TP group on one node" and
    bandwidth, which only relaxes it further) and the continuous relaxation is solved
    with the same valid inequalities; it solves in milliseconds at fleet scale.
    """
    import highspy

    share = state.policy.share_gpus
    # GPU classes -> how many GPUs are of each.
    classes: dict[_GpuClass, int] = {}
    fixed_used = 0
    for s in state.nodes:
        for g in range(s.node.gpus):
            in_use = s.tenants[g] > 0
            if not s.node.schedulable:
                fixed_used += in_use
                continue
            key = _GpuClass(s.node.product, s.node.gpus, s.free[g], in_use)
            classes[key] = classes.get(key, 0) + 1
    keys = sorted(classes)
    # One column per class (GPUs of it in use; those in use already are a constant),
    # then one per (model, class): shards of the model there.
    cost = [0.0 if k.in_use else 1.0 for k in keys]
    lower = [float(classes[k]) if k.in_use else 0.0 for k in keys]
    upper = [float(classes[k]) for k in keys]
    fixed_used += sum(classes[k] for k in keys if k.in_use)
    cols: list[_ClassColumn] = []
    for d in state.demands:
        if residual[d.model] <= 0:
            continue
        for ci, (product, gpus, free, in_use) in enumerate(keys):
            req = d.requirement(product)
            if req is None or req.tp > gpus or req.hbm_per_gpu > free or (in_use and not share):
                continue
            cols.append(_ClassColumn(d, req, ci, len(cost)))
            cost.append(0.0)
            lower.append(0.0)
            upper.append(math.inf)
    rows: list[Row] = []
    for d in state.demands:
        r_m = residual[d.model]
        if r_m <= 0:
            continue
        row = {c.col: 1.0 / c.req.tp for c in cols if c.demand is d}
        if not row:
            return None
        rows.append(Row(row, float(r_m), float(r_m)))
    for ci, (product, gpus, free, in_use) in enumerate(keys):
        mine = [(c.col, c.req) for c in cols if c.klass == ci]
        if not mine:
            continue
        scale = max(free, 1)
        rows.append(Row({**{col: req.hbm_per_gpu / scale for col, req in mine},
                         ci: -free / scale}, -math.inf, 0.0))
        for j in CUTS:
            big_items = [col for col, req in mine if req.hbm_per_gpu * (j + 1) > free]
            if big_items:
                rows.append(Row({**{col: 1.0 for col in big_items}, ci: -float(j)},
                                -math.inf, 0.0))
        if not share:
            rows.append(Row({**{col: 1.0 for col, _ in mine}, ci: -1.0}, -math.inf, 0.0))
    if not rows:
        return float(fixed_used)
    h = _highs(cost, lower, upper, rows, integer=False)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    return float(h.getInfo().objective_function_value) + fixed_used
