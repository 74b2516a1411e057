"""The plan from a finished run: names, moves of a rebalance, shared flags, predicted
decode step times, and the KV capacity spare HBM gives each replica."""

from __future__ import annotations

from typing import NamedTuple, Optional

from kvpilot.api.gpus import GPUProduct
from kvpilot.api.memory import (
    DECODE_STEP_FIXED_SECONDS, decode_fixed_seconds, decode_step_seconds,
)
from kvpilot.operator.placement.model import (
    Assignment, Crowded, Existing, Move, NodeUsage, Plan, Unplaced,
)
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.spread import crowd_reason
from kvpilot.operator.placement.state import NodeState, Placed, existing_load, natural


class _Spot(NamedTuple):
    """Where a replica of this run landed, and what it needs there."""

    node: str
    gpus: tuple[int, ...]
    hbm: int
    kv_tokens: int
    kv_bytes_per_token: int
    step_bytes: int


class _Row(NamedTuple):
    """A replica of the plan, before its KV capacity and step time are worked out."""

    name: str
    model: str
    node: str
    gpus: tuple[int, ...]
    hbm: int
    kv_tokens: int
    kv_bytes_per_token: int
    existing: bool
    step_bytes: int


def gpu_step_seconds(s: NodeState, g: int, fixed: float = DECODE_STEP_FIXED_SECONDS,
                     gpu: Optional[GPUProduct] = None) -> Optional[float]:
    """A decode step on GPU ``g`` with every tenant busy; None when idle or the GPU's
    bandwidth is unknown."""
    gpu = gpu or s.node.gpu
    if s.tenants[g] == 0 or gpu.hbm_bandwidth is None:
        return None
    return decode_step_seconds(s.streamed[g], gpu, fixed)


def assemble(state: PlanState, kept: list[Existing], removals: list[str],
             previous: list[Existing], placed: list[Placed], unplaced: list[Unplaced]) -> Plan:
    """The plan of a finished run: ``kept``, ``removals`` and ``previous`` as
    ``existing.resolve_existing`` gave them, ``placed`` this run's replicas (their new
    names given here, or a rebalanced replica's old name), ``unplaced`` one entry per
    replica left pending. Names taken are marked in ``state``."""
    rows: list[_Row] = []
    for e in kept:
        kv_tokens, per_token = _kv(state, e)
        rows.append(_Row(e.name, e.model, e.node, tuple(e.gpus), e.hbm_per_gpu, kv_tokens,
                         per_token, True, _step(state, e)))
    moves: list[Move] = []
    avoided = len(kept)
    new_by_model: dict[str, list[_Spot]] = {}
    for p in placed:
        assert p.state is not None
        new_by_model.setdefault(p.demand.model, []).append(
            _Spot(p.state.node.name, p.gpus, p.req.hbm_per_gpu, p.req.kv_tokens,
                  p.req.kv_bytes_per_token, p.req.step_bytes))
    for model in sorted(new_by_model):
        fresh = new_by_model[model]
        old = [e for e in previous if e.model == model]
        # A rebalance keeps the name of a replica whose new place is its old one.
        for e in list(old):
            spot = next((f for f in fresh if f.node == e.node and f.gpus == tuple(e.gpus)),
                        None)
            if spot is not None:
                fresh.remove(spot)
                old.remove(e)
                rows.append(_row(e.name, model, spot, True))
                avoided += 1
        for e, spot in zip(list(old), list(fresh)):
            fresh.remove(spot)
            old.remove(e)
            moves.append(Move(e.name, model, e.node, tuple(e.gpus), spot.node, spot.gpus))
            rows.append(_row(e.name, model, spot, False))
        removals.extend(e.name for e in old)
        for name, spot in zip(state.fresh_names(model, len(fresh)), fresh):
            rows.append(_row(name, model, spot, False))
    for e in previous:  # a rebalanced model none of whose replicas could be placed
        if e.model not in new_by_model and e.name not in removals:
            removals.append(e.name)
    final = {s.node.name: s for s in state.nodes}
    model_rank = {d.model: i for i, d in enumerate(state.demands)}
    rows.sort(key=lambda r: (model_rank.get(r.model, len(model_rank)), r.model, natural(r.name)))
    facts = {s.index: s.node.gpu for s in state.nodes}
    assignments = tuple(_assignment(state, final[r.node], facts[final[r.node].index], r)
                        for r in rows)
    nodes = tuple(
        NodeUsage(s.node.name, s.node.product, s.cap, tuple(s.cap - f for f in s.free),
                  s.node.schedulable, tuple(s.streamed),
                  tuple(gpu_step_seconds(s, g, gpu=facts[s.index]) for g in range(s.node.gpus)))
        for s in state.nodes
    )
    return Plan(assignments, tuple(_name_unplaced(state, unplaced)), tuple(removals),
                tuple(moves), avoided, nodes, _crowded(state, assignments))


# A model crowded by replicas that ran before this plan while a node or GPU without one
# has room now: they stay put, as every running replica does.
RUNNING_STAY = ("replicas that run stay where they are (a move restarts one); a rollout or "
                "a scale-down spreads them again")


def _crowded(state: PlanState, assignments: tuple[Assignment, ...]) -> tuple[Crowded, ...]:
    """The spreading models some of whose replicas share a node ("node") or a GPU
    ("gpu") with another of them, in demand order."""
    out = []
    for d in state.demands:
        if not d.spreads:
            continue
        mine = [a for a in assignments if a.model == d.model]
        count: dict[tuple, int] = {}
        for a in mine:
            for key in _domains(a, d.apart_nodes):
                count[key] = count.get(key, 0) + 1
        sharing = [a for a in mine if any(count[k] > 1 for k in _domains(a, d.apart_nodes))]
        if sharing:
            out.append(Crowded(d.model, d.spread, len(sharing), len(mine),
                               crowd_reason(state, d) or RUNNING_STAY))
    return tuple(out)


def _domains(a: Assignment, nodes: bool) -> list[tuple]:
    return [(a.node,)] if nodes else [(a.node, g) for g in a.gpus]


def _row(name: str, model: str, spot: _Spot, existing: bool) -> _Row:
    return _Row(name, model, spot.node, spot.gpus, spot.hbm, spot.kv_tokens,
                spot.kv_bytes_per_token, existing, spot.step_bytes)


def _kv(state: PlanState, e: Existing) -> tuple[int, int]:
    """(KV tokens, KV bytes per token) of an existing replica whose budget is its model's
    requirement on that product; (0, 0) otherwise (it may have been sized differently)."""
    d = state.by_model.get(e.model)
    req = d.requirement(state.by_name[e.node].node.product) if d else None
    if req is not None and req.hbm_per_gpu == e.hbm_per_gpu:
        return req.kv_tokens, req.kv_bytes_per_token
    return 0, 0


def _step(state: PlanState, e: Existing) -> int:
    product = state.by_name[e.node].node.product
    return existing_load(e, state.by_model.get(e.model), product).step_bytes


def _assignment(state: PlanState, s: NodeState, gpu: GPUProduct, r: _Row) -> Assignment:
    """Spare HBM of a GPU (free after the plan) is split evenly among its tenants; a
    replica's KV capacity grows by the tokens the tightest of its GPUs gives."""
    gpus, kv = r.gpus, r.kv_tokens
    extra = 0
    if r.kv_bytes_per_token:
        extra = min((s.free[g] // s.tenants[g]) // r.kv_bytes_per_token for g in gpus)
    d = state.by_model.get(r.model)
    fixed = (decode_fixed_seconds(d.spec, len(gpus)) if d is not None and d.spec is not None
             else DECODE_STEP_FIXED_SECONDS)
    times = [gpu_step_seconds(s, g, fixed, gpu) for g in gpus]
    seconds = None if any(t is None for t in times) else max(times)
    return Assignment(r.name, r.model, r.node, gpus, r.hbm, kv, r.existing,
                      shared=any(s.tenants[g] > 1 for g in gpus), step_bytes=r.step_bytes,
                      step_seconds=seconds, kv_capacity=kv + max(0, extra))


def _name_unplaced(state: PlanState, unplaced: list[Unplaced]) -> list[Unplaced]:
    out = []
    by_model: dict[str, list[Unplaced]] = {}
    for u in unplaced:
        by_model.setdefault(u.model, []).append(u)
    for model, items in by_model.items():
        names = state.fresh_names(model, len(items))
        out.extend(Unplaced(n, u.model, u.reason) for n, u in zip(names, items))
    return out

