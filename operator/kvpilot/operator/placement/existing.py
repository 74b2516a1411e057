"""Replicas that already run: account for them before anything new is placed.

They stay where they are (a move costs a restart), unless the policy rebalances. Those on
a node that is not Ready are lost and placed again as new; beyond a model's desired
count the surplus is removed, those freeing the most first.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

from kvpilot.operator.placement.model import Demand, Existing
from kvpilot.operator.placement.state import NodeState, existing_load, natural


class Resolved(NamedTuple):
    """What becomes of the replicas that already run."""

    kept: list[Existing]  # stay where they are; their load is on the node states
    removals: list[str]  # names of those to remove (lost with their node, or surplus)
    previous: list[Existing]  # of a model a rebalance places again: it may move them


def resolve_existing(existing: Sequence[Existing], by_name: Mapping[str, NodeState],
                     by_model: Mapping[str, Demand], rebalance: bool) -> Resolved:
    """Load the ``existing`` replicas (by name) onto the node states ``by_name``;
    ``by_model``: the demands, in their order; ``rebalance``: every replica of a
    demanded model is placed again (it is ``previous``, not loaded)."""
    removals: list[str] = []
    alive: list[Existing] = []
    for e in existing:
        s = by_name.get(e.node)
        if s is None or not s.node.ready:
            removals.append(e.name)  # lost with its node: placed again as new
            continue
        if len(set(e.gpus)) != len(e.gpus) or any(not 0 <= g < s.node.gpus for g in e.gpus):
            raise ValueError(f"existing replica {e.name!r}: GPUs {list(e.gpus)} are not "
                             f"distinct indices below {s.node.gpus} on node {e.node!r}")
        alive.append(e)
    previous: list[Existing] = []
    if rebalance:
        previous = [e for e in alive if e.model in by_model]
        alive = [e for e in alive if e.model not in by_model]
    for e in alive:
        _load(by_name, by_model, e, add=True)
    kept = list(alive)
    for d in by_model.values():
        mine = [e for e in kept if e.model == d.model]
        excess = len(mine) - d.replicas
        if excess <= 0:
            continue
        for e in sorted(mine, key=lambda e: _removal_key(by_name, by_model, e))[:excess]:
            _load(by_name, by_model, e, add=False)
            kept.remove(e)
            removals.append(e.name)
    return Resolved(kept, removals, previous)


def _load(by_name: Mapping[str, NodeState], by_model: Mapping[str, Demand], e: Existing,
          add: bool) -> None:
    s = by_name[e.node]
    step, budget = existing_load(e, by_model.get(e.model), s.node.product)
    (s.add if add else s.remove)(e.model, e.gpus, e.hbm_per_gpu, step, budget)


def _removal_key(by_name: Mapping[str, NodeState], by_model: Mapping[str, Demand],
                 e: Existing) -> tuple:
    """Which surplus replica goes first: one on a cordoned node (being drained), then,
    for a model that spreads, the one on its most crowded node ("node") or GPU ("gpu"),
    then the one that is alone on the most GPUs (removing it frees whole GPUs), then the
    one on the least loaded node, then the newest name."""
    s = by_name[e.node]
    d = by_model.get(e.model)
    crowd = 0
    if d is not None and d.apart_nodes:
        crowd = s.models.get(e.model, 0)
    elif d is not None and d.spreads:
        crowd = max((s.on_gpu[g].get(e.model, 0) for g in e.gpus), default=0)
    alone = sum(1 for g in e.gpus if s.tenants[g] == 1)
    used = sum(s.cap - f for f in s.free)
    return (not s.node.cordoned, -crowd, -alone, used,
            [-x if isinstance(x, int) else x for x in natural(e.name)])
