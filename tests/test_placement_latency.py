"""Latency targets through HBM bandwidth, and TP groups packed without stranding replicas:
tiny worlds with exact expectations."""

from __future__ import annotations

from kvpilot.api.gpus import CATALOG
from kvpilot.api.memory import itl_step_bytes
from kvpilot.api.model import ModelSpec
from kvpilot.operator.placement import (
    Assignment, Demand, Node, Plan, Policy, Requirement, Snapshot, demand_for, place,
)
from kvpilot.operator.placement.check import violations
from tests.conftest import llama_70b, llama_spec

GiB = 2**30
GB = 10**9
H100 = "NVIDIA-H100-80GB-HBM3"


def where(plan):
    return {a.replica: (a.node, a.gpus) for a in plan.assignments}


def sound(snapshot, demands, plan, policy=Policy()):
    assert violations(snapshot, demands, policy, plan) == []
    return plan


def streaming(model, replicas, gib, step_gb, budget_gb=None, tp=1):
    """A demand of ``gib`` HBM and ``step_gb`` bytes per decode step per GPU, with an ITL
    budget of ``budget_gb`` per step (None: no target)."""
    budget = None if budget_gb is None else budget_gb * GB
    return Demand(model, replicas, {"*": Requirement(tp, gib * GiB, step_bytes=step_gb * GB,
                                                     step_budget=budget)})


def catalog_node(name, product, gpus):
    return Node(name, product, gpus, CATALOG[product].hbm_bytes)


# -- bandwidth as a second resource -------------------------------------------------------


def test_bandwidth_limits_how_many_replicas_share_a_gpu():
    # Memory holds all three on one GPU (30 of 80 GiB); their ITL budget of 100 GB per
    # step holds two (80 GB), not three (120 GB).
    snap = Snapshot(nodes=(Node("a", "P", 2, 80 * GiB),))
    demands = [streaming("m", 3, gib=10, step_gb=40, budget_gb=100)]
    plan = sound(snap, demands, place(snap, demands))
    assert where(plan) == {"m-0": ("a", (0,)), "m-1": ("a", (0,)), "m-2": ("a", (1,))}
    assert plan.nodes[0].streamed == (80 * GB, 40 * GB)


def test_the_tightest_itl_among_tenants_binds_replicas_without_a_target_too():
    # "free" has no ITL target, but sharing a GPU with "tight" (100 GB per step) it must
    # stay within tight's budget: tight 40 + free 50 fits, a second free (140) does not.
    snap = Snapshot(nodes=(Node("a", "P", 2, 80 * GiB),))
    demands = [streaming("tight", 1, gib=20, step_gb=40, budget_gb=100),
               streaming("free", 2, gib=10, step_gb=50)]
    plan = sound(snap, demands, place(snap, demands))
    gpu_of = {r: g for r, (_, g) in where(plan).items()}
    assert gpu_of["tight-0"] in (gpu_of["free-0"], gpu_of["free-1"])
    assert gpu_of["free-0"] != gpu_of["free-1"]
    assert sorted(plan.nodes[0].streamed) == [50 * GB, 90 * GB]


def test_check_flags_a_gpu_streaming_past_its_tenants_budget():
    snap = Snapshot(nodes=(Node("a", "P", 1, 80 * GiB),))
    demands = [streaming("m", 3, gib=10, step_gb=40, budget_gb=100)]
    crowded = Plan(assignments=tuple(
        Assignment(f"m-{i}", "m", "a", (0,), 10 * GiB, step_bytes=40 * GB) for i in range(3)))
    assert "a GPU 0: streams 120000000000 bytes per decode step, the tightest ITL among " \
           "its tenants allows 100000000000" in violations(snap, demands, Policy(), crowded)


def test_reason_when_the_hbm_is_free_but_the_bandwidth_is_not():
    snap = Snapshot(nodes=(Node("a", "P", 1, 80 * GiB),))
    # The step bytes left beside two replicas (20 GB) would take 13 of the requirement's
    # sequences, but a fix is checked with the spec sized as the operator sizes it:
    # Llama-3-8B's own 16.1 GB of weights leave room for 3 sequences of 8K tokens
    # (3.2 GB of KV); fp8 KV does not fit either way.
    spec = ModelSpec.model_validate(llama_spec(sla={"contextTokens": 8192,
                                                    "concurrentSequences": 32}))
    req = Requirement(1, 10 * GiB, step_bytes=40 * GB, step_budget=100 * GB,
                      kv_bytes_per_token=131072)
    demands = [Demand("m", 3, {"*": req}, spec=spec)]
    plan = place(snap, demands)
    (u,) = plan.unplaced
    assert u.reason == (
        "needs 1 GPU with >= 10.0 GiB free and room for 40.0 GB per decode step on P; the "
        "GPUs with that HBM free have at most 20.0 GB per step left within their tenants' "
        "ITL targets (a); try concurrentSequences <= 3, a looser "
        "interTokenLatencyMilliseconds or adding GPU nodes (0/1 nodes fit: 1 not enough HBM "
        "bandwidth for the ITL targets)")


# -- latency targets of one replica alone -------------------------------------------------


def itl(ms, **sla):
    return ModelSpec.model_validate(llama_spec(sla={
        "contextTokens": 8192, "concurrentSequences": 16, "interTokenLatencyMilliseconds": ms,
        **sla}))


def test_itl_target_rules_out_a_slow_product_with_a_reason_that_says_what_would_fit():
    snap = Snapshot(nodes=(catalog_node("h100", H100, 8), catalog_node("l4", "NVIDIA-L4", 2)))
    d = demand_for("llama", itl(50), snap, Policy())
    h100 = d.requirements[H100]
    assert (h100.tp, h100.step_bytes) == (1, 33240391680)
    assert h100.step_budget == itl_step_bytes(itl(50), 1, CATALOG[H100])
    # On a node of two L4s (300 GB/s) TP 2 holds the memory (17.5 GiB per GPU), but a
    # step of 16.6 GB takes 67.8 ms; 12.1 GB fit in 50 ms: the weight shard (8.0 GB)
    # and 7 sequences of 0.54 GB.
    assert d.unfit["NVIDIA-L4"] == (
        "a decode step takes 67.8 ms at tensorParallel 2 (interTokenLatencyMilliseconds 50); "
        "try concurrentSequences <= 7")


def test_tp_auto_takes_the_degree_that_meets_the_ttft():
    # Llama-3.1-70B, one 32K prompt: 6.0e15 FLOPs at 494.5 TFLOP/s per H100: 3.05 s at
    # TP 4, 1.52 s at TP 8; a 2 s TTFT takes TP 8 although TP 2 holds the memory.
    base = llama_70b()
    spec = base.model_copy(update={"sla": base.sla.model_copy(update={
        "context_tokens": 32768, "concurrent_sequences": 1, "ttft_milliseconds": 2000})})
    snap = Snapshot(nodes=(catalog_node("h100", H100, 8),))
    assert demand_for("m", spec, snap, Policy()).requirements[H100].tp == 8
    snap4 = Snapshot(nodes=(catalog_node("h100", H100, 4),))
    assert demand_for("m", spec, snap4, Policy()).unfit[H100] == (
        "a prefill of 32768 tokens takes 6098 ms at tensorParallel 2 (ttftMilliseconds 2000); "
        "no tensorParallel up to 4 meets it on this product")


def test_unknown_bandwidth_is_said_with_the_label_that_states_it():
    snap = Snapshot(nodes=(Node("x", "ACME-X1", 2, 80 * GiB),
                           Node("y", "ACME-X1", 2, 80 * GiB, bandwidth_gbps=2000)))
    d = demand_for("llama", itl(50), snap, Policy())
    # The slowest node of a product sizes it, and one of them states nothing.
    assert d.unfit["ACME-X1"].startswith(
        "HBM bandwidth of ACME-X1 is unknown, so interTokenLatencyMilliseconds cannot be "
        "checked: label its nodes kvpilot.dev/gpu.bandwidth-gbps=<GB/s>")
    stated = Snapshot(nodes=(Node("y", "ACME-X1", 2, 80 * GiB, bandwidth_gbps=2000),))
    assert demand_for("llama", itl(50), stated, Policy()).requirements["ACME-X1"].tp == 1


# -- TP groups ------------------------------------------------------------------------------


def test_tp8_replicas_stack_before_a_small_replica_tops_their_gpus_up():
    # Two Llama-3.1-70B at TP 8 (32K x 8 bf16 KV: 28.4 GiB per GPU) stack on the eight
    # H100s (56.9 GiB each); Llama-3-8B (33.0 GiB) no longer fits beside them and takes
    # the L40S. All three on 9 GPUs.
    base = llama_70b(tensorParallel=8)
    seventy = base.model_copy(update={"sla": base.sla.model_copy(update={
        "context_tokens": 32768})})
    snap = Snapshot(nodes=(catalog_node("h100", H100, 8), catalog_node("l40s", "NVIDIA-L40S", 1)))
    demands = [demand_for("llama-70b", seventy, snap, Policy(), replicas=2),
               demand_for("llama-8b", ModelSpec.model_validate(llama_spec()), snap, Policy(),
                          replicas=1)]
    plan = sound(snap, demands, place(snap, demands))
    assert where(plan) == {"llama-70b-0": ("h100", tuple(range(8))),
                           "llama-70b-1": ("h100", tuple(range(8))),
                           "llama-8b-0": ("l40s", (0,))}
    assert plan.gpus_used == 9


def test_tp_groups_are_staggered_over_the_fewest_gpus():
    # Three TP-4 replicas of 40 GiB per GPU: two shards to a GPU of 80, six GPUs, not
    # the eight that stacking whole groups takes (4 with two groups, 4 with one).
    snap = Snapshot(nodes=(Node("a", "P", 8, 80 * GiB),))
    demands = [Demand("m", 3, {"*": Requirement(4, 40 * GiB)})]
    plan = sound(snap, demands, place(snap, demands))
    assert where(plan) == {"m-0": ("a", (0, 1, 3, 4)), "m-1": ("a", (0, 2, 3, 5)),
                           "m-2": ("a", (1, 2, 4, 5))}
    assert plan.gpus_used == 6


def test_a_replica_left_unplaced_gets_room_by_moving_others():
    # q (TP 2, 40 GiB per GPU) opens a's two GPUs, which are completed with one s
    # (30 GiB) each; p (TP 2, 35 GiB) then finds no two GPUs. Repair empties a, puts p
    # there, and q beside it again (75 GiB per GPU); the two s go to b.
    snap = Snapshot(nodes=(Node("a", "P", 2, 80 * GiB), Node("b", "P", 1, 80 * GiB)))
    demands = [Demand("q", 1, {"*": Requirement(2, 40 * GiB)}),
               Demand("p", 1, {"*": Requirement(2, 35 * GiB)}),
               Demand("s", 2, {"*": Requirement(1, 30 * GiB)})]
    plan = sound(snap, demands, place(snap, demands))
    assert plan.complete
    assert where(plan) == {"q-0": ("a", (0, 1)), "p-0": ("a", (0, 1)),
                           "s-0": ("b", (0,)), "s-1": ("b", (0,))}


def test_spare_hbm_becomes_kv_capacity():
    # One replica alone on an 80 GiB GPU needing 30 GiB (10 GiB of it KV at 1 MiB per
    # token): the 50 GiB left hold 51,200 more tokens. Two share a GPU: 10 GiB left,
    # 5 GiB each, 5,120 tokens more.
    req = Requirement(1, 30 * GiB, kv_tokens=10240, kv_bytes_per_token=2**20)
    one = place(Snapshot(nodes=(Node("a", "P", 1, 80 * GiB),)), [Demand("m", 1, {"*": req})])
    assert one.assignments[0].kv_capacity == 10240 + 51200
    two = place(Snapshot(nodes=(Node("a", "P", 1, 70 * GiB),)), [Demand("m", 2, {"*": req})])
    assert [a.kv_capacity for a in two.assignments] == [10240 + 5120, 10240 + 5120]


def test_reason_on_an_empty_node_names_the_sla_that_fits():
    # Llama-3-8B at 8K x 16 needs 33.0 GiB on one GPU; an empty L4 holds 22.5: 15.0 GiB
    # of weights, 2 GiB overhead, and 5 sequences of 1 GiB of KV.
    snap = Snapshot(nodes=(catalog_node("l4", "NVIDIA-L4", 1),))
    d = demand_for("llama", ModelSpec.model_validate(llama_spec()), snap, Policy())
    (u,) = place(snap, [d]).unplaced
    assert u.reason == (
        "fits no allowed GPU product at any tensorParallel (NVIDIA-L4: needs 33.0 GiB per GPU "
        "even at tensorParallel 1 (the most GPUs on one node), a GPU holds 22.5 GiB); try "
        "concurrentSequences <= 5 (0/1 nodes fit: 1 GPU too small at any tensorParallel)")
