"""Check a plan against its inputs, independently of how it was made.

Recomputes every GPU's load from the snapshot and the plan's assignments: no GPU holds
more than its usable HBM (unless existing replicas already did), no GPU's tenants
stream more bytes per decode step than the tightest ITL budget among them allows (unless
existing replicas already did), no node holds more replicas than its pod limit (unless
existing replicas already did), no TP group leaves its node, nothing new lands on a node
that is cordoned or not Ready or on a product the model does not allow, and every demanded replica is either placed or has a reason. The
benchmark and the tests run it on every plan, the engine's and the exact solver's.

And spread: a new replica of a model that spreads over nodes shares its node with
another replica of the model only while no node that holds none of them has room for
one (tp GPUs where it fits, by the plan's final load, on a product where a replica takes
its fewest GPUs: spreading never raises its tensorParallel); over GPUs, the same of a
GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from kvpilot.api.memory import usable_hbm
from kvpilot.operator.placement.model import Demand, Node, Plan, Policy, Snapshot
from kvpilot.operator.placement.state import existing_load, gpu_fits


def violations(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
               plan: Plan) -> list[str]:
    """Every way ``plan`` breaks the rules; empty when it is sound."""
    out: list[str] = []
    nodes = {n.name: n for n in snapshot.nodes}
    by_model = {d.model: d for d in demands}
    existing = {e.name: e for e in snapshot.replicas}
    load: dict[tuple[str, int], int] = {}
    tenants: dict[tuple[str, int], int] = {}
    streamed: dict[tuple[str, int], int] = {}
    budgets: dict[tuple[str, int], list[int]] = {}
    names: set[str] = set()
    for a in plan.assignments:
        if a.replica in names:
            out.append(f"{a.replica}: assigned twice")
        names.add(a.replica)
        node = nodes.get(a.node)
        if node is None:
            out.append(f"{a.replica}: unknown node {a.node}")
            continue
        if len(set(a.gpus)) != len(a.gpus) or any(not 0 <= g < node.gpus for g in a.gpus):
            out.append(f"{a.replica}: GPUs {list(a.gpus)} are not distinct GPUs of {a.node}")
            continue
        old = existing.get(a.replica)
        stays = old is not None and old.node == a.node and tuple(old.gpus) == a.gpus
        if a.existing and not stays:
            out.append(f"{a.replica}: marked existing but not where it ran")
        d = by_model.get(a.model)
        if stays:
            step, budget = existing_load(old, d, node.product)
        else:
            req = d.size_on(node.product) if d else None
            step, budget = a.step_bytes, (req.step_budget if req else None)
            if req is not None and req.step_bytes != a.step_bytes:
                out.append(f"{a.replica}: streams {a.step_bytes} bytes per step, the model "
                           f"{req.step_bytes} on {node.product}")
        for g in a.gpus:
            streamed[(a.node, g)] = streamed.get((a.node, g), 0) + step
            if budget is not None:
                budgets.setdefault((a.node, g), []).append(budget)
        if not stays:
            if not node.schedulable:
                out.append(f"{a.replica}: placed on unschedulable node {a.node}")
            d = by_model.get(a.model)
            req = d.requirement(node.product) if d else None
            if req is None:
                out.append(f"{a.replica}: {node.product} is not allowed or does not fit")
            elif (req.tp, req.hbm_per_gpu) != (len(a.gpus), a.hbm_per_gpu):
                out.append(f"{a.replica}: takes {len(a.gpus)} x {a.hbm_per_gpu}, the model "
                           f"needs {req.tp} x {req.hbm_per_gpu} on {node.product}")
        for g in a.gpus:
            load[(a.node, g)] = load.get((a.node, g), 0) + a.hbm_per_gpu
            tenants[(a.node, g)] = tenants.get((a.node, g), 0) + 1
    old_load: dict[tuple[str, int], int] = {}
    old_streamed: dict[tuple[str, int], int] = {}
    for e in snapshot.replicas:
        if e.node not in nodes:
            continue
        step, _ = existing_load(e, by_model.get(e.model), nodes[e.node].product)
        for g in e.gpus:
            old_load[(e.node, g)] = old_load.get((e.node, g), 0) + e.hbm_per_gpu
            old_streamed[(e.node, g)] = old_streamed.get((e.node, g), 0) + step
    for key, step in sorted(streamed.items()):
        limit = min(budgets[key]) if budgets.get(key) else None
        if limit is not None and step > limit and step > old_streamed.get(key, 0):
            out.append(f"{key[0]} GPU {key[1]}: streams {step} bytes per decode step, the "
                       f"tightest ITL among its tenants allows {limit}")
    for (node_name, g), used in sorted(load.items()):
        cap = usable_hbm(nodes[node_name].gpu_hbm, policy.reserve)
        if used > max(cap, old_load.get((node_name, g), 0)):
            out.append(f"{node_name} GPU {g}: {used} bytes on {cap}")
        if not policy.share_gpus and tenants[(node_name, g)] > 1:
            if tenants[(node_name, g)] > sum(1 for e in snapshot.replicas
                                             if e.node == node_name and g in e.gpus):
                out.append(f"{node_name} GPU {g}: shared although sharing is off")
    pods = Counter(a.node for a in plan.assignments)
    pods_before = Counter(e.node for e in snapshot.replicas)
    for name, count in sorted(pods.items()):
        limit = nodes[name].max_pods
        if limit is not None and count > max(limit, pods_before[name]):
            out.append(f"{name}: {count} replicas on a node of {limit} pods")
    for a in plan.assignments:
        if a.shared != any(tenants[(a.node, g)] > 1 for g in a.gpus):
            out.append(f"{a.replica}: shared flag is wrong")
    for d in demands:
        placed = sum(1 for a in plan.assignments if a.model == d.model)
        missing = sum(1 for u in plan.unplaced if u.model == d.model)
        if placed > d.replicas:
            out.append(f"{d.model}: {placed} placed, {d.replicas} demanded")
        if placed + missing != d.replicas:
            out.append(f"{d.model}: {placed} placed + {missing} unplaced != {d.replicas}")
    for u in plan.unplaced:
        if not u.reason:
            out.append(f"{u.replica}: unplaced without a reason")
    final = _Final(nodes, policy, load, tenants, streamed, budgets, pods)
    for d in demands:
        if d.spreads:
            out.extend(_spread(d, plan, final))
    for n in plan.nodes:
        for g, used in enumerate(n.used):
            if used != load.get((n.name, g), 0):
                out.append(f"{n.name} GPU {g}: reports {used} used, assignments hold "
                           f"{load.get((n.name, g), 0)}")
    return out


class _Final:
    """Every GPU as the plan leaves it: does one more shard of a requirement fit there?"""

    def __init__(self, nodes: dict[str, Node], policy: Policy, load, tenants, streamed,
                 budgets, pods) -> None:
        self.nodes, self.policy, self.pods = nodes, policy, pods
        self.load, self.tenants, self.streamed, self.budgets = load, tenants, streamed, budgets

    def fewest_gpus(self, d: Demand) -> Optional[int]:
        """The fewest GPUs a replica of ``d`` takes on a schedulable node that holds it."""
        return min((r.tp for n in self.nodes.values() if n.schedulable
                    and (r := d.requirement(n.product)) is not None and r.tp <= n.gpus),
                   default=None)

    def gpus_with_room(self, d: Demand, name: str, holding: dict) -> int:
        """GPUs of node ``name`` that hold no replica of ``d`` (``holding``: (node, GPU)
        -> its replicas) and take one more shard of it; 0 where the node takes none, or
        only at more GPUs than the replica's fewest."""
        node = self.nodes[name]
        req = d.requirement(node.product)
        if req is None or not node.schedulable or req.tp > node.gpus:
            return 0
        if req.tp > (self.fewest_gpus(d) or 0):
            return 0
        if node.max_pods is not None and self.pods[name] >= node.max_pods:
            return 0
        cap = usable_hbm(node.gpu_hbm, self.policy.reserve)
        room = 0
        for g in range(node.gpus):
            key = (name, g)
            if holding.get(key):
                continue
            limit = min(self.budgets[key]) if self.budgets.get(key) else None
            if gpu_fits(cap - self.load.get(key, 0), self.tenants.get(key, 0),
                        self.streamed.get(key, 0), limit, req, self.policy.share_gpus):
                room += 1
        return room // req.tp * req.tp


def _spread(d: Demand, plan: Plan, final: _Final) -> list[str]:
    """A new replica of ``d`` that shares its node (spread node) or a GPU (spread gpu)
    with another replica of ``d`` while a node, or GPUs, holding none has room for it."""
    mine = [a for a in plan.assignments if a.model == d.model]
    per_gpu: dict[tuple[str, int], int] = Counter((a.node, g) for a in mine for g in a.gpus)
    if d.apart_nodes:
        per_node = Counter(a.node for a in mine)
        crowded = sorted({a.node for a in mine if not a.existing and per_node[a.node] > 1})
        if not crowded:
            return []
        free = [n for n in sorted(final.nodes) if not per_node[n]
                and final.gpus_with_room(d, n, per_gpu)]
        if free:
            return [f"{d.model}: {per_node[crowded[0]]} replicas on {crowded[0]} while "
                    f"{free[0]}, holding none, has room for one (spread node)"]
        return []
    crowded_gpus = sorted({(a.node, g) for a in mine if not a.existing for g in a.gpus
                           if per_gpu[(a.node, g)] > 1})
    if not crowded_gpus:
        return []
    free = [n for n in sorted(final.nodes) if final.gpus_with_room(d, n, per_gpu)]
    if free:
        node, g = crowded_gpus[0]
        return [f"{d.model}: {per_gpu[(node, g)]} replicas on {node} GPU {g} while {free[0]} "
                f"has GPUs holding none with room for one (spread gpu)"]
    return []
