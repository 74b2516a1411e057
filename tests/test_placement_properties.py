"""Properties of every plan (hypothesis): no GPU holds more than it has nor streams more
per decode step than the tightest ITL budget among its tenants, no TP group leaves its
node, nothing lands on a disallowed product or an unschedulable node, every
replica is placed or has a reason, a new replica of a model that spreads shares a node
(or GPU) with another only when no node (or GPU) holding none has room for it, and equal
inputs give equal plans.

The checks here are written out again, independently of ``placement.check``, so that a
mistake shared by the engine and its checker still fails a test.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpilot.operator.placement import (
    SPREADS, Demand, Existing, Node, Policy, Requirement, Snapshot, place, without,
)
from kvpilot.operator.placement.check import violations

GiB = 2**30
PRODUCTS = {"P80": 80 * GiB, "P40": 40 * GiB, "P24": 24 * GiB}


@st.composite
def worlds(draw):
    nodes = []
    for i in range(draw(st.integers(0, 5))):
        product = draw(st.sampled_from(sorted(PRODUCTS)))
        nodes.append(Node(
            f"n{i}", product, draw(st.sampled_from([1, 2, 4, 8])), PRODUCTS[product],
            cordoned=draw(st.booleans()) and draw(st.booleans()),
            ready=not (draw(st.booleans()) and draw(st.booleans())),
        ))
    demands = []
    for m in range(draw(st.integers(1, 4))):
        reqs = {}
        for product in sorted(PRODUCTS):
            if draw(st.booleans()):
                tp = draw(st.sampled_from([1, 1, 2, 4, 8]))
                hbm = int(draw(st.floats(0.05, 1.0)) * PRODUCTS[product])
                # Bytes per decode step: at most what it holds; an ITL budget a third
                # of the time, from one to four replicas' worth.
                step = int(hbm * draw(st.floats(0.5, 1.0)))
                budget = (int(step * draw(st.floats(1.0, 4.0)))
                          if draw(st.integers(0, 2)) == 0 else None)
                reqs[product] = Requirement(tp, hbm, step_bytes=step, step_budget=budget)
        allowed = tuple(p for p in sorted(PRODUCTS) if draw(st.booleans()))
        demands.append(Demand(f"m{m}", draw(st.integers(0, 6)), reqs, allowed,
                              spread=draw(st.sampled_from(SPREADS))))
    policy = Policy(
        packing=draw(st.sampled_from([0.0, 0.5, 1.0])),
        reserve=draw(st.sampled_from([0.0, 0.1])),
        spread_replicas=draw(st.booleans()),
        share_gpus=draw(st.booleans()),
        rebalance=draw(st.booleans()),
    )
    return Snapshot(nodes=tuple(nodes)), demands, policy


def existing_from(plan, snapshot: Snapshot) -> Snapshot:
    """The plan's replicas as the next snapshot's running replicas."""
    return Snapshot(nodes=snapshot.nodes, replicas=tuple(
        Existing(a.replica, a.model, a.node, a.gpus, a.hbm_per_gpu) for a in plan.assignments
    ))


def check_independently(snapshot: Snapshot, demands, policy: Policy, plan) -> None:
    nodes = {n.name: n for n in snapshot.nodes}
    old = {e.name: e for e in snapshot.replicas}
    by_model = {d.model: d for d in demands}
    usable = {n: int(node.gpu_hbm * (1 - policy.reserve)) for n, node in nodes.items()}
    load: dict[tuple[str, int], int] = {}
    streamed: dict[tuple[str, int], int] = {}
    budgets: dict[tuple[str, int], list[int]] = {}
    existing_load: dict[tuple[str, int], int] = {}
    for e in snapshot.replicas:
        for g in e.gpus:
            existing_load[(e.node, g)] = existing_load.get((e.node, g), 0) + e.hbm_per_gpu
    for a in plan.assignments:
        node = nodes[a.node]
        assert len(set(a.gpus)) == len(a.gpus) and all(0 <= g < node.gpus for g in a.gpus)
        e = old.get(a.replica)
        if not (e is not None and e.node == a.node and tuple(e.gpus) == a.gpus):
            assert node.ready and not node.cordoned, a
            d = by_model[a.model]
            assert not d.products or node.product in d.products, a
            req = d.requirements.get(node.product) or d.requirements.get("*")
            assert req is not None and (req.tp, req.hbm_per_gpu) == (len(a.gpus), a.hbm_per_gpu)
            assert a.step_bytes == req.step_bytes
        d = by_model.get(a.model)
        req = (d.requirements.get(node.product) or d.requirements.get("*")) if d else None
        for g in a.gpus:
            load[(a.node, g)] = load.get((a.node, g), 0) + a.hbm_per_gpu
            streamed[(a.node, g)] = streamed.get((a.node, g), 0) + a.step_bytes
            if req is not None and req.step_budget is not None:
                budgets.setdefault((a.node, g), []).append(req.step_budget)
    for (n, g), used in load.items():
        assert used <= max(usable[n], existing_load.get((n, g), 0)), (n, g, used)
    for key, step in streamed.items():
        if budgets.get(key) and key not in existing_load:
            assert step <= min(budgets[key]), (key, step, budgets[key])
    for d in demands:
        placed = sum(1 for a in plan.assignments if a.model == d.model)
        reasons = [u.reason for u in plan.unplaced if u.model == d.model]
        assert placed + len(reasons) == d.replicas and all(reasons)
    check_spread(snapshot, demands, policy, plan, usable, load, streamed, budgets)


def check_spread(snapshot, demands, policy, plan, usable, load, streamed, budgets) -> None:
    """Where a new replica of a spreading model shares its node ("node") or a GPU ("gpu")
    with another replica of it, no node (GPUs) holding none of them takes one more."""
    tenants: dict[tuple[str, int], int] = {}
    pods: dict[str, int] = {}
    for a in plan.assignments:
        pods[a.node] = pods.get(a.node, 0) + 1
        for g in a.gpus:
            tenants[(a.node, g)] = tenants.get((a.node, g), 0) + 1

    def sized(d, n):
        if not (n.ready and not n.cordoned) or (d.products and n.product not in d.products):
            return None
        req = d.requirements.get(n.product) or d.requirements.get("*")
        return req if req is not None and req.tp <= n.gpus else None

    def room(d, n, holding) -> bool:
        """Node n takes one more replica of d on GPUs that ``holding`` says hold none,
        at the fewest GPUs a replica of d takes anywhere."""
        req = sized(d, n)
        if req is None or (n.max_pods is not None and pods.get(n.name, 0) >= n.max_pods):
            return False
        if req.tp > min(r.tp for m in snapshot.nodes if (r := sized(d, m)) is not None):
            return False
        ok = 0
        for g in range(n.gpus):
            key = (n.name, g)
            if holding.get(key) or usable[n.name] - load.get(key, 0) < req.hbm_per_gpu:
                continue
            if tenants.get(key) and not policy.share_gpus:
                continue
            tightest = min(budgets.get(key, []) + ([req.step_budget] if req.step_budget
                                                   is not None else []), default=None)
            if tightest is None or streamed.get(key, 0) + req.step_bytes <= tightest:
                ok += 1
        return ok >= req.tp

    for d in demands:
        if d.spread == "none":
            continue
        mine = [a for a in plan.assignments if a.model == d.model]
        on_gpu: dict[tuple[str, int], int] = {}
        on_node: dict[str, int] = {}
        for a in mine:
            on_node[a.node] = on_node.get(a.node, 0) + 1
            for g in a.gpus:
                on_gpu[(a.node, g)] = on_gpu.get((a.node, g), 0) + 1
        if d.spread == "node":
            crowded = [a for a in mine if not a.existing and on_node[a.node] > 1]
            free = [n.name for n in snapshot.nodes if n.name not in on_node
                    and room(d, n, on_gpu)]
        else:
            crowded = [a for a in mine if not a.existing
                       and any(on_gpu[(a.node, g)] > 1 for g in a.gpus)]
            free = [n.name for n in snapshot.nodes if room(d, n, on_gpu)]
        assert not (crowded and free), (d.model, d.spread, crowded, free)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(worlds())
def test_every_plan_is_sound(world):
    snapshot, demands, policy = world
    plan = place(snapshot, demands, policy)
    check_independently(snapshot, demands, policy, plan)
    assert violations(snapshot, demands, policy, plan) == []


@SETTINGS
@given(worlds(), st.lists(st.integers(0, 6), min_size=4, max_size=4))
def test_replanning_keeps_what_runs_and_stays_sound(world, counts):
    snapshot, demands, policy = world
    first = place(snapshot, demands, dataclasses.replace(policy, rebalance=False))
    again = existing_from(first, snapshot)
    changed = [dataclasses.replace(d, replicas=c) for d, c in zip(demands, counts)]
    plan = place(again, changed, policy)
    check_independently(again, changed, policy, plan)
    assert violations(again, changed, policy, plan) == []
    if not policy.rebalance:
        kept = {a.replica for a in plan.assignments if a.existing}
        assert plan.moves_avoided == len(kept)
        for a in plan.assignments:
            if a.replica in {e.name for e in again.replicas}:
                assert a.existing
        # Nothing that ran was moved: it was kept where it was or removed.
        assert {e.name for e in again.replicas} == kept | set(plan.removals)


@SETTINGS
@given(worlds())
def test_same_input_same_plan(world):
    snapshot, demands, policy = world
    assert place(snapshot, demands, policy) == place(snapshot, demands, policy)


@SETTINGS
@given(worlds())
def test_removing_a_replica_then_asking_again_is_consistent(world):
    snapshot, demands, policy = world
    first = place(snapshot, demands, dataclasses.replace(policy, rebalance=False))
    running = existing_from(first, snapshot)
    if not running.replicas:
        return
    victim = running.replicas[0]
    # What runs is what is demanded; then one replica fewer of the victim's model: the
    # rest still fits where it is.
    lowered = [dataclasses.replace(d, replicas=first.placed(d.model) - (d.model == victim.model))
               for d in demands]
    sim = without(running, lowered, policy, replicas=[victim.name])
    assert sim.holds and sim.gpus_after <= sim.gpus_before
    assert all(a.existing for a in sim.plan.assignments)
