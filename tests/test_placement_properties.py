"""Properties of every plan (hypothesis): no GPU holds more than it has nor streams more
per decode step than the tightest ITL budget among its tenants, no TP group leaves its
node, nothing lands on a disallowed product or an unschedulable node, every
replica is placed or has a reason, a new replica of a model that spreads shares a node
(or GPU) with another only when no node (or GPU) holding none has room for it, and equal
inputs give equal plans.

The checks (``tests.placement_helpers.check_independently``) are written out again,
independently of ``placement.check``, so that a mistake shared by the engine and its
checker still fails a test.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpilot.operator.placement import (
    SPREADS, Demand, Existing, Node, Policy, Requirement, Snapshot, place, without,
)
from kvpilot.operator.placement.check import violations
from tests.placement_helpers import check_independently

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
