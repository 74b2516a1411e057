"""place() on tiny worlds, with exact expectations: node names and GPU indices literally."""

from __future__ import annotations

import pytest

from kvpilot.api.gpus import CATALOG
from kvpilot.api.model import ModelSpec
from kvpilot.operator.placement import (
    Demand, Existing, Node, Policy, Requirement, Snapshot, demand_for, place, without,
)
from kvpilot.operator.placement.check import violations
from kvpilot.operator.placement.improve import consolidate
from kvpilot.operator.placement.packing import best_fill
from kvpilot.operator.placement.plan_state import PlanState
from tests.conftest import llama_70b, llama_spec

GiB = 2**30
H100 = "NVIDIA-H100-80GB-HBM3"
H200 = "NVIDIA-H200"


def node(name, gpus=2, hbm=80, product="P80", **kw):
    return Node(name, product, gpus, hbm * GiB, **kw)


def demand(model, replicas, tp=1, gib=30.0, products=(), **per_product):
    """A demand needing ``tp`` GPUs of ``gib`` each on any allowed product."""
    reqs = {"*": Requirement(tp, int(gib * GiB))}
    reqs.update({p: Requirement(t, int(g * GiB)) for p, (t, g) in per_product.items()})
    return Demand(model, replicas, reqs, tuple(products))


def where(plan):
    return {a.replica: (a.node, a.gpus) for a in plan.assignments}


def sound(snapshot, demands, policy, plan):
    assert violations(snapshot, demands, policy, plan) == []
    return plan


def test_small_replicas_share_one_gpu():
    snap = Snapshot(nodes=(node("a"),))
    demands = [demand("m", 2, gib=30)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {"m-0": ("a", (0,)), "m-1": ("a", (0,))}
    assert plan.gpus_used == 1
    assert plan.shared_gpus == (("a", 0),)
    assert [a.shared for a in plan.assignments] == [True, True]
    assert plan.nodes[0].used == (60 * GiB, 0)


def test_largest_replica_first_then_best_fit_into_the_fullest_gpu():
    # 50 goes first (largest), onto a's GPU 0; 30 fits beside it (best fit) rather than
    # opening a GPU; the second 30 no longer fits there and opens GPU 1.
    snap = Snapshot(nodes=(node("a"),))
    demands = [demand("small", 2, gib=30), demand("big", 1, gib=50)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {"small-0": ("a", (0,)), "small-1": ("a", (1,)), "big-0": ("a", (0,))}
    # The plan lists models in demand order.
    assert [a.replica for a in plan.assignments] == ["small-0", "small-1", "big-0"]


def test_tp_group_stays_on_one_node():
    snap = Snapshot(nodes=(node("one", gpus=1), node("two", gpus=2), node("four", gpus=4)))
    demands = [demand("m", 2, tp=2, gib=50)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    # Packing: the tightest node that holds the group first, then the next.
    assert where(plan) == {"m-0": ("two", (0, 1)), "m-1": ("four", (0, 1))}


def test_tp_group_larger_than_any_node_gets_a_reason():
    snap = Snapshot(nodes=(node("a", gpus=2), node("b", gpus=4)))
    plan = place(snap, [demand("m", 1, tp=8, gib=10)])
    assert plan.assignments == ()
    (u,) = plan.unplaced
    assert u.replica == "m-0"
    assert u.reason == (
        "needs 8 GPUs with >= 10.0 GiB free each on P80; largest free set on any allowed "
        "node is 4 x 80.0 GiB (b); no allowed node has 8 GPUs (the most is 4): add nodes "
        "with 8 or more (0/2 nodes fit: 2 fewer than 8 GPUs)"
    )


def test_cordoned_and_unready_nodes_take_nothing():
    snap = Snapshot(nodes=(node("cordoned", cordoned=True), node("down", ready=False),
                           node("ok")))
    demands = [demand("m", 1)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {"m-0": ("ok", (0,))}
    assert [n.schedulable for n in plan.nodes] == [False, False, True]


def test_disallowed_product_is_filtered_and_explained():
    snap = Snapshot(nodes=(node("small", product="P40", hbm=40), node("big")))
    plan = place(snap, [demand("m", 2, gib=30, products=("P40",))])
    assert where(plan) == {"m-0": ("small", (0,)), "m-1": ("small", (1,))}
    plan = place(snap, [demand("m", 3, gib=30, products=("P40",))])
    (u,) = plan.unplaced
    assert u.reason.startswith("needs 1 GPU with >= 30.0 GiB free on P40; ")
    assert "try adding P80 to gpuProducts" in u.reason
    assert u.reason.endswith("(0/2 nodes fit: 1 GPU product not allowed, 1 not enough free HBM)")


def test_tp_differs_per_product():
    snap = Snapshot(nodes=(node("p40", product="P40", hbm=40, gpus=4), node("p80", gpus=1)))
    demands = [demand("m", 2, products=("P40", "P80"), P40=(2, 35), P80=(1, 70))]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    # The P80 GPU is the larger fresh GPU, so it goes first; the second needs 2 x P40.
    assert where(plan) == {"m-0": ("p80", (0,)), "m-1": ("p40", (0, 1))}
    assert [a.tp for a in plan.assignments] == [1, 2]


def test_reserve_keeps_a_fraction_of_every_gpu_free():
    snap = Snapshot(nodes=(node("a", gpus=1),))
    assert place(snap, [demand("m", 1, gib=75)]).complete
    plan = place(snap, [demand("m", 1, gib=75)], Policy(reserve=0.1))
    assert not plan.complete
    assert "largest free set on any allowed node is 1 x 72.0 GiB (a)" in plan.unplaced[0].reason


def test_spread_policy_uses_more_gpus_and_nodes():
    snap = Snapshot(nodes=(node("a"), node("b")))
    demands = [demand("m", 3, gib=10)]
    packed = sound(snap, demands, Policy.pack(), place(snap, demands, Policy.pack()))
    assert where(packed) == {"m-0": ("a", (0,)), "m-1": ("a", (0,)), "m-2": ("a", (0,))}
    spread = sound(snap, demands, Policy.spread(), place(snap, demands, Policy.spread()))
    assert where(spread) == {"m-0": ("a", (0,)), "m-1": ("b", (0,)), "m-2": ("a", (1,))}
    assert (packed.gpus_used, spread.gpus_used) == (1, 3)


def test_no_sharing_gives_each_replica_its_own_gpus():
    snap = Snapshot(nodes=(node("a", gpus=4),))
    demands = [demand("m", 3, gib=10), demand("n", 2, gib=5)]
    policy = Policy(share_gpus=False)
    plan = sound(snap, demands, policy, place(snap, demands, policy))
    assert plan.gpus_used == 4 and plan.shared_gpus == ()
    assert len(plan.unplaced) == 1
    assert plan.unplaced[0].reason.startswith(
        "needs 1 GPU with >= 5.0 GiB free on P80; no allowed node has a unshared GPU free")


def test_existing_replicas_stay_and_their_hbm_counts():
    snap = Snapshot(
        nodes=(node("a"), node("b")),
        replicas=(Existing("m-0", "m", "b", (1,), 60 * GiB),),
    )
    demands = [demand("m", 2, gib=60)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {"m-0": ("b", (1,)), "m-1": ("b", (0,))}
    assert [a.existing for a in plan.assignments] == [True, False]
    assert plan.moves_avoided == 1 and plan.moves == () and plan.removals == ()


def test_surplus_replicas_are_removed_those_alone_on_a_gpu_first():
    snap = Snapshot(
        nodes=(node("a"),),
        replicas=(
            Existing("m-0", "m", "a", (0,), 30 * GiB),
            Existing("m-1", "m", "a", (1,), 30 * GiB),
            Existing("other-0", "other", "a", (0,), 30 * GiB),
        ),
    )
    plan = place(snap, [demand("m", 1), demand("other", 1)])
    assert plan.removals == ("m-1",)  # alone on GPU 1: removing it frees the GPU
    assert where(plan) == {"m-0": ("a", (0,)), "other-0": ("a", (0,))}
    assert plan.gpus_used == 1


def test_replicas_of_a_node_that_is_not_ready_are_replaced():
    snap = Snapshot(
        nodes=(node("down", ready=False), node("up")),
        replicas=(Existing("m-0", "m", "down", (0,), 30 * GiB),),
    )
    plan = place(snap, [demand("m", 1)])
    assert plan.removals == ("m-0",)
    assert where(plan) == {"m-1": ("up", (0,))}  # a new name: m-0 still exists until deleted


def test_replicas_of_models_not_demanded_are_left_alone():
    snap = Snapshot(nodes=(node("a"),),
                    replicas=(Existing("x-0", "x", "a", (0,), 70 * GiB),))
    plan = place(snap, [demand("m", 1, gib=30)])
    assert where(plan) == {"m-0": ("a", (1,)), "x-0": ("a", (0,))}
    assert plan.removals == ()


def test_rebalance_moves_replicas_and_counts_what_stayed():
    snap = Snapshot(
        nodes=(node("a"), node("b")),
        replicas=(
            Existing("m-0", "m", "a", (0,), 30 * GiB),
            Existing("m-1", "m", "b", (0,), 30 * GiB),
        ),
    )
    kept = place(snap, [demand("m", 2)])
    assert kept.moves_avoided == 2 and kept.gpus_used == 2
    plan = sound(snap, [demand("m", 2)], Policy(rebalance=True),
                 place(snap, [demand("m", 2)], Policy(rebalance=True)))
    assert plan.gpus_used == 1
    assert where(plan) == {"m-0": ("a", (0,)), "m-1": ("a", (0,))}
    assert plan.moves_avoided == 1
    (move,) = plan.moves
    assert (move.replica, move.from_node, move.to_node, move.to_gpus) == ("m-1", "b", "a", (0,))


def test_empty_fleet_gives_every_replica_a_reason():
    plan = place(Snapshot(), [demand("m", 2), demand("n", 1)])
    assert plan.assignments == ()
    assert [(u.replica, u.reason) for u in plan.unplaced] == [
        ("m-0", "the fleet has no GPU nodes"),
        ("m-1", "the fleet has no GPU nodes"),
        ("n-0", "the fleet has no GPU nodes"),
    ]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="demanded twice"):
        place(Snapshot(), [demand("m", 1), demand("m", 2)])
    with pytest.raises(ValueError, match="appears twice"):
        place(Snapshot(nodes=(node("a"), node("a"))), [])
    with pytest.raises(ValueError, match="not distinct indices below 2"):
        place(Snapshot(nodes=(node("a"),),
                       replicas=(Existing("m-0", "m", "a", (2,), GiB),)), [])
    with pytest.raises(ValueError, match="packing must be in"):
        Policy(packing=2.0)


# -- demands from the memory model, and reasons that suggest fixes ---------------------


def catalog_node(name, product, gpus):
    return Node(name, product, gpus, CATALOG[product].hbm_bytes)


def test_tp_auto_is_chosen_per_product():
    # Per GPU (test_memory.py): TP 2 needs 83438608384 bytes, TP 4 42793046016.
    snap = Snapshot(nodes=(catalog_node("h100", H100, 8),
                           catalog_node("a100", "NVIDIA-A100-SXM4-40GB", 8),
                           catalog_node("l4", "NVIDIA-L4", 1)))
    d = demand_for("llama-70b", llama_70b(), snap, Policy())
    assert d.requirements == {
        # step bytes: the weight shard and the KV it holds (no ITL target: no budget)
        H100: Requirement(2, 83438608384, 65536, step_bytes=81291124736,
                          kv_bytes_per_token=163840),
        "NVIDIA-A100-SXM4-40GB": Requirement(4, 42793046016, 65536, step_bytes=40645562368,
                                             kv_bytes_per_token=81920),
    }
    assert d.unfit == {"NVIDIA-L4": "needs 153.4 GiB per GPU even at tensorParallel 1 (the most "
                                    "GPUs on one node), a GPU holds 22.5 GiB"}
    plan = place(snap, [d])
    assert where(plan) == {"llama-70b-0": ("h100", (0, 1))}
    assert plan.assignments[0].kv_tokens == 8192 * 8


def test_reason_suggests_a_larger_tensor_parallel_that_fits_now():
    snap = Snapshot(
        nodes=(catalog_node("h100", H100, 4),),
        replicas=tuple(Existing(f"x-{g}", "x", "h100", (g,), 30 * GiB) for g in (1, 2, 3)),
    )
    d = demand_for("llama-70b", llama_70b(tensorParallel=2), snap, Policy())
    (u,) = place(snap, [d]).unplaced
    assert u.reason == (
        "needs 2 GPUs with >= 77.7 GiB free each on NVIDIA-H100-80GB-HBM3; largest free set "
        "on any allowed node is 1 x 79.6 GiB (h100); try tensorParallel 4 "
        "(0/1 nodes fit: 1 not enough free HBM)"
    )


def test_reason_suggests_fp8_kv_or_fewer_sequences():
    # Llama-3-8B needs 33.0 GiB (16 GiB of KV); 29.6 GiB are free. FP8 halves the KV
    # cache (25.0 GiB fits); or (29.6 - 15.0 weights - 2 overhead) / 1 GiB per sequence
    # = 12 sequences.
    snap = Snapshot(nodes=(catalog_node("h100", H100, 1),),
                    replicas=(Existing("x-0", "x", "h100", (0,), 50 * GiB),))
    spec = ModelSpec.model_validate(llama_spec())
    d = demand_for("llama-8b", spec, snap, Policy())
    (u,) = place(snap, [d]).unplaced
    assert u.reason == (
        "needs 1 GPU with >= 33.0 GiB free on NVIDIA-H100-80GB-HBM3; largest free set on "
        "any allowed node is 1 x 29.6 GiB (h100); try kvCacheDtype fp8 or "
        "concurrentSequences <= 12 (0/1 nodes fit: 1 not enough free HBM)"
    )


def test_model_that_fits_no_product_says_why():
    snap = Snapshot(nodes=(catalog_node("l4", "NVIDIA-L4", 1),))
    d = demand_for("llama-70b", llama_70b(), snap, Policy())
    (u,) = place(snap, [d]).unplaced
    assert u.reason.startswith(
        "fits no allowed GPU product at any tensorParallel (NVIDIA-L4: needs 153.4 GiB per "
        "GPU even at tensorParallel 1 (the most GPUs on one node), a GPU holds 22.5 GiB)")
    assert u.reason.endswith("(0/1 nodes fit: 1 GPU too small at any tensorParallel)")


# -- scale-down simulation -------------------------------------------------------------


def test_scale_down_and_moves_are_asked_of_place():
    snap = Snapshot(
        nodes=(node("a"), node("b")),
        replicas=(
            Existing("m-0", "m", "a", (0,), 30 * GiB),
            Existing("m-1", "m", "b", (0,), 30 * GiB),
            Existing("m-2", "m", "b", (1,), 60 * GiB),
        ),
    )
    # m-2 is a 60 GiB replica of the same model in this toy; demands say 30 GiB each.
    demands = [demand("m", 3)]
    # Moving m-1 elsewhere: it fits beside m-0 on a's GPU 0, and b's GPU 0 empties.
    sim = without(snap, demands, replicas=["m-1"])
    assert sim.holds and sim.gpus_before == 3 and sim.gpus_after == 2 and sim.gpus_freed == 1
    # Scale-down: with the demand lowered, nothing needs a new home.
    sim = without(snap, [demand("m", 2)], replicas=["m-2"])
    assert sim.holds and sim.plan.assignments and all(a.existing for a in sim.plan.assignments)
    # Draining node a gives m-0's share a new home next to m-1 on b.
    sim = without(snap, demands, nodes=["a"])
    assert sim.holds
    assert [(a.node, a.gpus) for a in sim.plan.assignments if not a.existing] == [("b", (0,))]
    # Draining b too: nothing is left to hold m.
    sim = without(snap, demands, nodes=["a", "b"])
    assert not sim.holds and len(sim.plan.unplaced) == 3


# -- the packing steps -----------------------------------------------------------------


def test_best_fill_finds_the_least_slack():
    # Room 10 from 6 x1, 4 x2, 3 x3: 6 + 4 = 10 exactly.
    assert best_fill(10, [(6, 1), (4, 2), (3, 3)]) == (10, [1, 1, 0])
    # Room 9: 6 + 3 = 9 (greedy 6 alone leaves 3, which 3 fills).
    assert best_fill(9, [(6, 1), (4, 2), (3, 3)]) == (9, [1, 0, 1])
    assert best_fill(2, [(6, 1), (4, 2), (3, 3)]) == (0, [0, 0, 0])


def test_a_fresh_gpu_is_completed_with_the_best_fill():
    # Largest first with best fit alone: 40+40 | 30+30+25 | 25, three GPUs. Completing
    # the GPU a replica opens with the fill that leaves least unused: 40+30+30 | 40+25+25.
    snap = Snapshot(nodes=(node("n", gpus=4, hbm=100),))
    demands = [demand("a", 2, gib=40), demand("b", 2, gib=30), demand("c", 2, gib=25)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {
        "a-0": ("n", (0,)), "a-1": ("n", (1,)),
        "b-0": ("n", (0,)), "b-1": ("n", (0,)),
        "c-0": ("n", (1,)), "c-1": ("n", (1,)),
    }
    assert plan.nodes[0].used == (100 * GiB, 90 * GiB, 0, 0)


def test_consolidation_empties_a_gpu_by_moving_single_gpu_replicas():
    # A poor arrangement made by hand: 6 | 4 | 5 | 5 on four GPUs of 10.
    snap = Snapshot(nodes=(node("n", gpus=4, hbm=10),))
    demands = [demand("six", 1, gib=6), demand("four", 1, gib=4), demand("five", 2, gib=5)]
    state = PlanState(snap, demands, Policy())
    state.load_existing()
    pool = state.pools[0]
    s = state.nodes[0]
    for d, g in ((demands[0], 0), (demands[1], 1), (demands[2], 2), (demands[2], 3)):
        state.commit(d, pool, s, (g,), d.requirement("P80"))
    assert sum(1 for t in s.tenants if t) == 4
    consolidate(state, budget=1000)
    assert sum(1 for t in s.tenants if t) == 2
    assert sorted(s.free) == [0, 0, 10 * GiB, 10 * GiB]


def hand_made(snap, demands, layout):
    """A PlanState with this run's replicas placed by hand: ``layout`` lists (demand
    index, node index, GPUs), each committed with the demand's requirement on that
    node."""
    state = PlanState(snap, demands, Policy())
    state.load_existing()
    for d, n, gpus in layout:
        s = state.nodes[n]
        state.commit(demands[d], state.by_product[s.node.product], s, gpus,
                     demands[d].requirement(s.node.product))
    return state


def in_use(state):
    return {(s.node.name, g) for s in state.nodes for g, t in enumerate(s.tenants) if t}


def test_consolidation_moves_a_tp_group_onto_one_fresh_larger_gpu():
    # "m" needs two 24 GiB GPUs of "small" at TP 2, or one GPU of "big" at TP 1; placed by
    # hand on the small node, it holds two GPUs where one suffices. Consolidation moves
    # the whole TP group, opening the fresh big GPU.
    snap = Snapshot(nodes=(node("small", gpus=2, hbm=24, product="S"),
                           node("big", gpus=1, hbm=100, product="B")))
    demands = [demand("m", 1, S=(2, 20), B=(1, 38)), demand("x", 1, S=(1, 3), B=(1, 3))]
    state = hand_made(snap, demands, [(0, 0, (0, 1)), (1, 0, (0,))])
    assert in_use(state) == {("small", 0), ("small", 1)}
    consolidate(state, budget=1000)
    assert in_use(state) == {("big", 0)}
    assert [(p.state.node.name, p.gpus, p.req.tp) for p in state.placed] == [
        ("big", (0,), 1), ("big", (0,), 1)]


def test_consolidation_leaves_small_gpus_for_a_fresh_large_one():
    # Three 30 GiB replicas, one on each 40 GiB GPU: no GPU in use holds a second, so
    # single moves between them gain nothing. One fresh 100 GiB GPU holds all three.
    snap = Snapshot(nodes=(node("s", gpus=3, hbm=40, product="S"),
                           node("b", gpus=1, hbm=100, product="B")))
    demands = [demand("m", 3, gib=30)]
    state = hand_made(snap, demands, [(0, 0, (0,)), (0, 0, (1,)), (0, 0, (2,))])
    consolidate(state, budget=1000)
    assert in_use(state) == {("b", 0)}
    assert state.nodes[1].free == [10 * GiB]


def test_when_not_all_fit_the_plan_places_the_most_replicas():
    # One 50 GiB GPU; three replicas of 11 GiB and one of 39 GiB. Largest first (and
    # completing the GPU it opens) places 39 + 11: two replicas. The exact step places
    # the three small ones, the most that fit.
    snap = Snapshot(nodes=(node("n", gpus=1, hbm=50),))
    demands = [demand("small", 3, gib=11), demand("big", 1, gib=39)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert where(plan) == {"small-0": ("n", (0,)), "small-1": ("n", (0,)),
                           "small-2": ("n", (0,))}
    assert [u.model for u in plan.unplaced] == ["big"]
    assert plan.assignments[0].kv_capacity >= plan.assignments[0].kv_tokens


def test_the_exact_step_is_skipped_beyond_its_replica_limit(monkeypatch):
    from kvpilot.operator.placement import engine

    # The same instance with the exact step off: the constructive plan, two replicas.
    monkeypatch.setattr(engine, "EXACT_REPLICAS", 3)
    snap = Snapshot(nodes=(node("n", gpus=1, hbm=50),))
    demands = [demand("small", 3, gib=11), demand("big", 1, gib=39)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert sorted(where(plan)) == ["big-0", "small-0"]


def one_large_gpu_and_four_80(other: Demand) -> tuple[Snapshot, list[Demand]]:
    """One 140 GiB GPU (h) and four 80 GiB GPUs (a); "large" needs 127 GiB at TP 1 on
    the 140 GiB GPU or 64.5 GiB per GPU at TP 2 on the 80 GiB ones; then ``other``."""
    snap = Snapshot(nodes=(node("h", gpus=1, hbm=140, product="P140"),
                           node("a", gpus=4, hbm=80, product="P80")))
    large = Demand("large", 1, {"P140": Requirement(1, int(127 * GiB)),
                                "P80": Requirement(2, int(64.5 * GiB))}, ())
    return snap, [large, other]


def test_fresh_gpu_valued_by_how_full_it_ends_up():
    # "large" takes 127 GiB of the one 140 GiB GPU at TP 1 (13 GiB nothing fills) or
    # 64.5 GiB on two 80 GiB GPUs at TP 2 (a 15 GiB replica completes each). Opening the
    # largest GPU first gives 5 GPUs; the optimum is 4 (3 GPUs hold at most 300 GiB of
    # the 367 demanded): large on a's GPUs with a small beside each shard, 9 smalls on
    # the 140 GiB GPU, the last 5 on a third GPU of a.
    snap, demands = one_large_gpu_and_four_80(demand("small", 16, gib=15))
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert plan.complete
    assert plan.gpus_used == 4
    assert [(a.node, len(a.gpus)) for a in plan.assignments if a.model == "large"] == [("a", 2)]


def test_other_model_orders_decide_who_gets_the_scarce_gpu():
    # "large" (127 GiB at TP 1 on the one 140 GiB GPU, 64.5 GiB per GPU at TP 2 on 80 GiB
    # GPUs) comes first by size and takes the 140 GiB GPU, 13 GiB of it left to nothing;
    # "mid" (41.5 GiB: three to a 140 GiB GPU, one to an 80 GiB GPU) then needs three
    # GPUs of a: 4 in all. With the two swapped, mid fills the 140 GiB GPU three times
    # over and large runs at TP 2 on a: 3 GPUs.
    snap, demands = one_large_gpu_and_four_80(demand("mid", 3, gib=41.5))
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert plan.complete
    assert plan.gpus_used == 3
    assert where(plan) == {"large-0": ("a", (0, 1)), "mid-0": ("h", (0,)),
                           "mid-1": ("h", (0,)), "mid-2": ("h", (0,))}


def test_a_node_takes_no_more_replicas_than_its_pod_limit():
    # a's two GPUs would hold all four 30 GiB replicas; a takes two pods, so two go to b.
    snap = Snapshot(nodes=(node("a", gpus=2, max_pods=2), node("b", gpus=1)))
    demands = [demand("m", 4, gib=30)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert sorted(a.node for a in plan.assignments) == ["a", "a", "b", "b"]
    assert plan.gpus_used == 2


def test_the_pod_limit_counts_replicas_already_there_and_stacked_tp_groups():
    # a has one pod left (an existing replica holds the other): of two TP-2 replicas
    # that would stack on its GPUs, one goes there and one to b (which holds one).
    snap = Snapshot(nodes=(node("a", gpus=2, max_pods=2), node("b", gpus=2, hbm=30)),
                    replicas=(Existing("x-0", "x", "a", (0,), 10 * GiB),))
    demands = [demand("x", 1, gib=10), demand("m", 2, tp=2, gib=20)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert sorted((a.replica, a.node) for a in plan.assignments) == [
        ("m-0", "a"), ("m-1", "b"), ("x-0", "a")]


def test_a_replica_blocked_by_pod_limits_says_so():
    snap = Snapshot(nodes=(node("a", gpus=1, max_pods=1), node("b", gpus=1, max_pods=1)))
    demands = [demand("m", 3, gib=20)]
    plan = sound(snap, demands, Policy(), place(snap, demands))
    assert plan.placed("m") == 2
    assert plan.unplaced[0].reason == (
        "every node it fits is at its pod limit (a, b): add nodes or raise maxPods "
        "(0/2 nodes fit: 2 pod limit reached (1 pods))")


def test_the_check_counts_pods_per_node():
    from kvpilot.operator.placement.model import Assignment, Plan

    snap = Snapshot(nodes=(node("a", gpus=1, max_pods=1),))
    demands = [demand("m", 2, gib=20)]
    plan = Plan(assignments=tuple(Assignment(f"m-{i}", "m", "a", (0,), 20 * GiB, shared=True)
                                  for i in range(2)))
    assert "a: 2 replicas on a node of 1 pods" in violations(snap, demands, Policy(), plan)
