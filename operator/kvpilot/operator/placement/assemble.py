"""The plan from a finished run: names, moves of a rebalance, shared flags, predicted
decode step times, and the KV capacity spare HBM gives each replica."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from kvpilot.api.gpus import GPUProduct
from kvpilot.api.memory import (
    DECODE_STEP_FIXED_SECONDS, decode_fixed_seconds, decode_step_seconds,
)
from kvpilot.operator.placement.model import (
    Assignment, Crowded, Existing, Move, NodeUsage, Plan, Unplaced,
)
from kvpilot.operator.placement.state import NodeState, Placed, existing_load, natural

if TYPE_CHECKING:  # pragma: no cover
    from kvpilot.operator.placement.engine import World


def gpu_step_seconds(s: NodeState, g: int, fixed: float = DECODE_STEP_FIXED_SECONDS,
                     gpu: Optional[GPUProduct] = None) -> Optional[float]:
    """A decode step on GPU ``g`` with every tenant busy; None when idle or the GPU's
    bandwidth is unknown."""
    gpu = gpu or s.node.gpu
    if s.tenants[g] == 0 or gpu.hbm_bandwidth is None:
        return None
    return decode_step_seconds(s.streamed[g], gpu, fixed)


def assemble(world: "World", kept: list[Existing], removals: list[str],
             previous: list[Existing], placed: list[Placed], unplaced: list[Unplaced]) -> Plan:
    # (name, model, node, gpus, hbm, kv tokens, existing, step bytes, KV bytes per token)
    rows: list[tuple] = []
    for e in kept:
        rows.append((e.name, e.model, e.node, tuple(e.gpus), e.hbm_per_gpu, *_kv(world, e),
                     True, _step(world, e)))
    moves: list[Move] = []
    avoided = len(kept)
    new_by_model: dict[str, list] = {}
    for p in placed:
        assert p.state is not None
        new_by_model.setdefault(p.demand.model, []).append(
            (p.state.node.name, p.gpus, p.req.hbm_per_gpu, p.req.kv_tokens,
             p.req.kv_bytes_per_token, p.req.step_bytes))
    for model in sorted(new_by_model):
        fresh = new_by_model[model]
        old = [e for e in previous if e.model == model]
        # A rebalance keeps the name of a replica whose new place is its old one.
        for e in list(old):
            spot = next((f for f in fresh if f[0] == e.node and f[1] == tuple(e.gpus)), None)
            if spot is not None:
                fresh.remove(spot)
                old.remove(e)
                rows.append(_row(e.name, model, spot, True))
                avoided += 1
        for e, spot in zip(list(old), list(fresh)):
            fresh.remove(spot)
            old.remove(e)
            moves.append(Move(e.name, model, e.node, tuple(e.gpus), spot[0], spot[1]))
            rows.append(_row(e.name, model, spot, False))
        removals.extend(e.name for e in old)
        for name, spot in zip(world.fresh_names(model, len(fresh)), fresh):
            rows.append(_row(name, model, spot, False))
    for e in previous:  # a rebalanced model none of whose replicas could be placed
        if e.model not in new_by_model and e.name not in removals:
            removals.append(e.name)
    final = {s.node.name: s for s in world.states}
    model_rank = {d.model: i for i, d in enumerate(world.demands)}
    rows.sort(key=lambda r: (model_rank.get(r[1], len(model_rank)), r[1], natural(r[0])))
    facts = {s.index: s.node.gpu for s in world.states}
    assignments = tuple(_assignment(world, final[r[2]], facts[final[r[2]].index], *r)
                        for r in rows)
    nodes = tuple(
        NodeUsage(s.node.name, s.node.product, s.cap, tuple(s.cap - f for f in s.free),
                  s.node.schedulable, tuple(s.streamed),
                  tuple(gpu_step_seconds(s, g, gpu=facts[s.index]) for g in range(s.node.gpus)))
        for s in world.states
    )
    return Plan(assignments, tuple(_name_unplaced(world, unplaced)), tuple(removals),
                tuple(moves), avoided, nodes, _crowded(world, assignments))


# A model crowded by replicas that ran before this plan while a node or GPU without one
# has room now: they stay put, as every running replica does.
RUNNING_STAY = ("replicas that run stay where they are (a move restarts one); a rollout or "
                "a scale-down spreads them again")


def _crowded(world: "World", assignments: tuple[Assignment, ...]) -> tuple[Crowded, ...]:
    """The spreading models some of whose replicas share a node ("node") or a GPU
    ("gpu") with another of them, in demand order."""
    out = []
    for d in world.demands:
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
                               world.crowd_reason(d) or RUNNING_STAY))
    return tuple(out)


def _domains(a: Assignment, nodes: bool) -> list[tuple]:
    return [(a.node,)] if nodes else [(a.node, g) for g in a.gpus]


def _row(name: str, model: str, spot: tuple, existing: bool) -> tuple:
    node, gpus, hbm, kv, per_token, step = spot
    return (name, model, node, gpus, hbm, kv, per_token, existing, step)


def _kv(world: "World", e: Existing) -> tuple[int, int]:
    """(KV tokens, KV bytes per token) of an existing replica whose budget is its model's
    requirement on that product; (0, 0) otherwise (it may have been sized differently)."""
    d = world.by_model.get(e.model)
    req = d.requirement(world.by_name[e.node].node.product) if d else None
    if req is not None and req.hbm_per_gpu == e.hbm_per_gpu:
        return req.kv_tokens, req.kv_bytes_per_token
    return 0, 0


def _step(world: "World", e: Existing) -> int:
    return existing_load(e, world.by_model.get(e.model), world.by_name[e.node].node.product)[0]


def _assignment(world: "World", s: NodeState, gpu: GPUProduct, name: str, model: str, node: str,
                gpus: tuple[int, ...], hbm: int, kv: int, per_token: int, existing: bool,
                step: int) -> Assignment:
    """Spare HBM of a GPU (free after the plan) is split evenly among its tenants; a
    replica's KV capacity grows by the tokens the tightest of its GPUs gives."""
    extra = 0
    if per_token:
        extra = min((s.free[g] // s.tenants[g]) // per_token for g in gpus)
    d = world.by_model.get(model)
    fixed = (decode_fixed_seconds(d.spec, len(gpus)) if d is not None and d.spec is not None
             else DECODE_STEP_FIXED_SECONDS)
    times = [gpu_step_seconds(s, g, fixed, gpu) for g in gpus]
    seconds = None if any(t is None for t in times) else max(times)
    return Assignment(name, model, node, gpus, hbm, kv, existing,
                      shared=any(s.tenants[g] > 1 for g in gpus), step_bytes=step,
                      step_seconds=seconds, kv_capacity=kv + max(0, extra))


def _name_unplaced(world: "World", unplaced: list[Unplaced]) -> list[Unplaced]:
    out = []
    by_model: dict[str, list[Unplaced]] = {}
    for u in unplaced:
        by_model.setdefault(u.model, []).append(u)
    for model, items in by_model.items():
        names = world.fresh_names(model, len(items))
        out.extend(Unplaced(n, u.model, u.reason) for n, u in zip(names, items))
    return out

