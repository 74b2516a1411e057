"""The operator on the real control plane, DRA mode: Models become claims and pods that
the real kube-scheduler binds and allocates where placement planned them.

One control plane for the module, with GPUs published as ResourceSlices the way NVIDIA's
DRA driver publishes them (memory as consumable capacity). The operator runs as a real
process; evidence is what the API server holds: pod bindings, claim allocations with
consumed capacity, Model status, Events, and the audit log of the operator's writes.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from kvpilot.api.memory import replica_budget
from kvpilot.api.model import ModelSpec
from kvpilot.operator.objects import spec_hash

from e2e.fleet import HUGE, LLAMA, MISTRAL, QWEN, SELECTOR, model
from e2e.operator import OperatorProcess, operator_writes, wait_for
from e2e.state import (
    check_consistent, condition, events, model_status, objects, replicas, running,
)

@pytest.fixture(scope="module")
def operator(dra_cluster, tmp_path_factory):
    # No worker answers a drain here: a replica that drains goes after the drain timeout.
    op = OperatorProcess(dra_cluster, tmp_path_factory.mktemp("operator") / "operator.log",
                         drain_timeout_seconds="5")
    op.start()
    yield op
    op.stop()


def test_models_become_claims_and_pods_where_the_plan_says(dra_cluster, operator):
    dra_cluster.apply([LLAMA, QWEN, MISTRAL, HUGE])
    want = {"llama": 2, "qwen": 3, "mistral": 1}
    reps = wait_for("6 replicas running", lambda: running(dra_cluster, want), 90,
                    log=operator.log)
    holders = check_consistent(dra_cluster, reps)
    shared = [g for g, models in holders.items() if len(set(models)) >= 2]
    assert shared, f"no GPU shared by two Models: {dict(holders)}"

    status = wait_for("llama status", lambda: (s := model_status(dra_cluster, "llama"))
                      .get("readyReplicas") == 2 and s, 30, log=operator.log)
    assert (status["replicas"], status["tensorParallel"], status["hbmPerGpu"],
            status["kvCapacityTokens"]) == (2, 1, "21.0 GiB", 8192 * 4)
    assert status["selector"] == f"{SELECTOR},kvpilot.dev/model=llama"
    assert sorted(p["replica"] for p in status["placements"]) == ["llama-0", "llama-1"]
    assert condition(status, "Ready")["status"] == "True"
    assert any(e["reason"] == "Placed" for e in events(dra_cluster, "llama"))

    huge = wait_for("huge unschedulable", lambda: condition(
        model_status(dra_cluster, "huge"), "Unschedulable").get("status") == "True"
        and model_status(dra_cluster, "huge"), 30, log=operator.log)
    assert "per GPU" in condition(huge, "Unschedulable")["message"]
    assert "huge-0" not in replicas(dra_cluster)
    assert any(e["reason"] == "DoesNotFit" for e in events(dra_cluster, "huge"))
    table = dra_cluster.kubectl("get", "models").stdout
    assert "21.0 GiB" in table


def test_an_idle_reconcile_makes_no_writes(dra_cluster, operator):
    wait_for("replicas settled", lambda: running(
        dra_cluster, {"llama": 2, "qwen": 3, "mistral": 1}), 60, log=operator.log)
    time.sleep(4)  # status catching up with the last pods
    before = len(operator_writes(dra_cluster))
    time.sleep(3 * 2 + 1)  # three reconcile intervals of 2 s
    after = operator_writes(dra_cluster)
    assert len(after) == before, [
        (e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("name"))
        for e in after[before:]]
    assert before > 0  # the audit log does see the operator's writes


def test_a_cordoned_node_is_emptied_make_before_break_and_a_deleted_one_at_once(
        dra_cluster, operator):
    want = {"llama": 2, "qwen": 3, "mistral": 1}
    reps = wait_for("replicas", lambda: running(dra_cluster, want), 60, log=operator.log)
    victim = reps["llama-0"]["pod"]["spec"]["nodeName"]
    moved = sum(1 for r in reps.values() if r["pod"]["spec"]["nodeName"] == victim)
    dra_cluster.kubectl("cordon", victim)
    reps = wait_for(f"replicas off {victim}", lambda: (r := running(dra_cluster, want)) and all(
        x["pod"]["spec"]["nodeName"] != victim for x in r.values()) and r, 150, log=operator.log)
    check_consistent(dra_cluster, reps)
    moves = [e for m in want for e in events(dra_cluster, m)
             if e["reason"] == "Draining" and f"moving off cordoned node {victim}" in e["message"]]
    assert len(moves) == moved, moves  # each replica drained once its replacement was Ready
    assert not any(e["reason"] == "ReplicaLost" for m in want for e in events(dra_cluster, m))

    second = next(r for n, r in sorted(reps.items()) if n.startswith("llama-"))["pod"]["spec"][
        "nodeName"]  # the lost replica came back under a new name
    dra_cluster.kubectl("delete", "node", second)
    reps = wait_for(f"replicas off {second}", lambda: (r := running(dra_cluster, want)) and all(
        x["pod"]["spec"]["nodeName"] not in (victim, second) for x in r.values()) and r, 120,
        log=operator.log)
    check_consistent(dra_cluster, reps)


def test_killing_the_operator_during_a_rollout_leaves_no_duplicates_or_orphans(
        dra_cluster, operator, tmp_path):
    operator.kill()
    rng = random.Random(7)
    dra_cluster.apply([model("burst", 10, weights="1Gi", layers=24, kv_heads=2, head_dim=64,
                             context=4096, seqs=8)])
    op = OperatorProcess(dra_cluster, tmp_path / "killed.log")
    for i in range(10):
        op.start()
        time.sleep(rng.uniform(1.0, 4.0))  # start-up takes ~1 s: kills land mid-rollout
        op.kill(signal.SIGKILL)
    op.start()
    try:
        want = {"llama": 2, "qwen": 3, "mistral": 1, "burst": 10}
        reps = wait_for("all replicas after the kills", lambda: running(dra_cluster, want),
                        120, log=op.log)
        time.sleep(3)  # a pass or two more: nothing may change
        assert set(replicas(dra_cluster)) == set(reps)
        check_consistent(dra_cluster, reps)
        live = {kind: {o["metadata"]["name"] for o in objects(dra_cluster, kind)
                       if not o["metadata"].get("deletionTimestamp")}
                for kind in ("pods", "resourceclaims")}
        assert live["pods"] == live["resourceclaims"] == set(reps)
    finally:
        op.stop()
    operator.start()  # the module's operator again, for the tests after this one


def test_a_rollout_of_ten_models_with_the_operator_killed_twenty_times_ends_on_the_spec(
        dra_cluster, operator, tmp_path):
    """Every replica's pod and claim end on the Model's new spec and its budget, however
    the kills land (mid-pass, between a pod's and its claim's deletion, ...)."""
    small = [model(f"roll-{i}", 1 + i % 2, weights="1Gi", layers=24, kv_heads=2, head_dim=64,
                   context=4096, seqs=8) for i in range(10)]
    dra_cluster.apply(small)
    want = {m["metadata"]["name"]: m["spec"]["replicas"] for m in small}
    wait_for("the ten Models placed", lambda: running(dra_cluster, want, others=True), 120,
             log=operator.log)
    operator.kill()
    for m in small:
        m["spec"]["sla"]["concurrentSequences"] = 24  # a bigger claim for every replica
    dra_cluster.apply(small)
    rng = random.Random(11)
    op = OperatorProcess(dra_cluster, tmp_path / "rollout.log", drain_timeout_seconds="3")
    for _ in range(20):
        op.start()
        time.sleep(rng.uniform(0.5, 3.0))
        op.kill(signal.SIGKILL)
    op.start()
    budget = {m["metadata"]["name"]: replica_budget(ModelSpec.model_validate(m["spec"]), 1)
              .per_gpu for m in small}
    current = {m["metadata"]["name"]: spec_hash(
        dra_cluster.get("model", m["metadata"]["name"])["spec"]) for m in small}

    def rolled_out() -> dict | None:
        reps = running(dra_cluster, want, others=True)
        if not reps:
            return None
        for name, r in reps.items():
            model_name = r["pod"]["metadata"]["labels"]["kvpilot.dev/model"]
            if model_name in current and (
                    r["pod"]["metadata"]["annotations"].get("kvpilot.dev/spec-hash")
                    != current[model_name]):
                return None
        return reps

    try:
        reps = wait_for("every replica on the new spec", rolled_out, 240, log=op.log)
        check_consistent(dra_cluster, reps)  # every claim holds what its pod says
        for name, r in reps.items():
            model_name = r["pod"]["metadata"]["labels"]["kvpilot.dev/model"]
            if model_name not in current:
                continue
            claim = r["claim"]["metadata"]["annotations"]
            assert claim["kvpilot.dev/spec-hash"] == current[model_name], name
            assert int(claim["kvpilot.dev/hbm-per-gpu"]) == budget[model_name], name
    finally:
        op.stop()
        operator.start()  # the module's operator again: it removes the Models' replicas
    dra_cluster.kubectl("delete", "model", *current, "--wait=true", timeout=120)


def test_deleting_a_model_removes_its_pods_and_claims(dra_cluster, operator):
    dra_cluster.kubectl("delete", "model", "burst", "--wait=true", "--timeout=90s", timeout=100)
    left = [n for n in replicas(dra_cluster) if n.startswith("burst-")]
    assert left == []
    assert dra_cluster.kubectl("get", "model", "burst", check=False).returncode != 0


def test_a_standby_operator_takes_over_when_the_leader_stops(dra_cluster, operator, tmp_path):
    standby = OperatorProcess(dra_cluster, tmp_path / "standby.log", identity="standby")
    standby.start()
    try:
        wait_for("standby waiting", lambda: "standing by" in standby.log(), 30, log=standby.log)
        operator.stop()  # releases the Lease
        wait_for("standby leading", lambda: "acquired lease" in standby.log(), 30,
                 log=standby.log)
        dra_cluster.apply([model("late", 1, weights="1Gi", layers=24, kv_heads=2,
                                 head_dim=64, context=4096, seqs=8)])
        wait_for("late replica", lambda: "late-0" in replicas(dra_cluster), 60,
                 log=standby.log)
        lease = dra_cluster.get("lease", "-n", "kvpilot-system", "kvpilot-operator")
        assert lease["spec"]["holderIdentity"] == "standby"
    finally:
        standby.stop()
        operator.start()
