"""The fleet reconciler as a pure function: tiny clusters as plain dicts, exact results.

``World`` holds API objects as the API server would return them and applies a pass's
actions the way the API server, scheduler and KWOK would (pods bound to their planned
node and Ready), so a test can run passes until the world settles.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from kvpilot.api.quantity import GiB
from kvpilot.operator.reconcile import Actions, Config, reconcile
from kvpilot.operator.view import (
    FOREIGN, cluster_view, dra_available, dra_product, epoch,
)
from tests.operator_helpers import H100, NOW, gpu_slice, model, node


@dataclass
class World:
    nodes: list[dict]
    models: list[dict]
    slices: list[dict] = field(default_factory=list)
    pods: dict = field(default_factory=dict)
    claims: dict = field(default_factory=dict)
    services: dict = field(default_factory=dict)
    foreign_claims: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    mode: str = "devicePlugin"

    def view(self, now_s: float | None = None):
        return cluster_view(self.nodes, self.slices, list(self.pods.values()),
                            list(self.claims.values()) + self.foreign_claims, self.mode,
                            now_s=now_s, not_ready_grace=60,
                            services=list(self.services.values()))

    def step(self, drained: dict | None = None, now_s: float | None = None,
             crash_after: int | None = None) -> Actions:
        """One pass, its writes applied in the fleet loop's order (deletes, creates,
        drains, statuses, events); ``crash_after``: only that many of them, as an
        operator killed in the middle of the pass leaves the world."""
        actions = reconcile(self.models, self.view(now_s), Config(mode=self.mode,
                                                                  drain_seconds=60),
                            NOW, drained, now_s)
        if crash_after is not None:
            left = crash_after
            for name in ("deletes", "creates", "drains", "statuses", "events"):
                items = getattr(actions, name)
                setattr(actions, name, items[:left])
                left = max(0, left - len(items))
        for ns, name in actions.drains:  # as the fleet loop patches a pod it drains
            self.pods[(ns, name)]["metadata"]["annotations"]["kvpilot.dev/drain-started"] = NOW
            self.pods[(ns, name)]["metadata"]["labels"]["kvpilot.dev/serving"] = "false"
        for d in actions.deletes:
            (self.pods if d.kind == "Pod" else self.claims).pop((d.namespace, d.name))
        for obj in actions.creates:
            obj = copy.deepcopy(obj)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            if obj["kind"] == "Service":
                self.services[key] = obj
            elif obj["kind"] == "Pod":
                obj["spec"]["nodeName"] = obj["spec"]["nodeSelector"]["kubernetes.io/hostname"]
                obj["status"] = {"phase": "Running", "podIP": f"127.64.0.{len(self.pods) + 1}",
                                 "conditions": [{"type": "Ready", "status": "True"}]}
                self.pods[key] = obj
            else:
                self.claims[key] = obj
        for ns, name, status in actions.statuses:
            m = next(m for m in self.models if m["metadata"]["name"] == name
                     and m["metadata"]["namespace"] == ns)
            m["status"] = {k: v for k, v in status.items() if v is not None}
        self.events.extend(actions.events)
        return actions

    def settle(self, passes: int = 4) -> None:
        for _ in range(passes):
            if self.step().writes == 0:
                return
        raise AssertionError("the world did not settle")

    def placements(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (p["spec"]["nodeName"],
                       tuple(int(g) for g in p["metadata"]["annotations"]["kvpilot.dev/gpus"]
                             .split(",")))
                for (_, name), p in sorted(self.pods.items())}

    def status(self, name: str) -> dict:
        return next(m for m in self.models if m["metadata"]["name"] == name)["status"]


def replicas_made(actions: Actions) -> list[str]:
    """Names of the pods and claims a pass creates (not the Models' Services)."""
    return [o["metadata"]["name"] for o in actions.creates if o["kind"] != "Service"]


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_first_pass_creates_the_pods_and_the_second_writes_nothing():
    w = World([node("a"), node("b"), node("c")], [model("m", 3)])
    first = w.step()
    assert [(o["kind"], o["metadata"]["name"]) for o in first.creates] == [
        ("Service", "m"), ("Pod", "m-0"), ("Pod", "m-1"), ("Pod", "m-2")]
    assert [e["reason"] for e in first.events] == ["Placed"]
    # Spread node, the default: a node each.
    assert w.placements() == {"m-0": ("a", (0,)), "m-1": ("b", (0,)), "m-2": ("c", (0,))}
    second = w.step()  # status catches up with the pods that now exist
    assert (second.creates, second.deletes, len(second.statuses)) == ([], [], 1)
    assert w.step().writes == 0
    s = w.status("m")
    assert (s["replicas"], s["readyReplicas"], s["tensorParallel"]) == (3, 3, 1)
    assert s["hbmPerGpu"] == "21.0 GiB"  # 15 + 128 KiB x 8192 x 4 (4 GiB) + 2
    # Device plugin: the GPU is the replica's alone, and its worker's pool takes all of it:
    # (85520809984 - 15 GiB - 2 GiB) / 128 KiB tokens.
    assert s["kvCapacityTokens"] == (85520809984 - 17 * 2**30) // 131072 == 513208
    env = {e["name"]: e.get("value") for e in
           w.pods[("default", "m-0")]["spec"]["containers"][0]["env"]}
    assert env["KVPILOT_HBM_PER_GPU_BYTES"] == "85520809984"
    assert w.pods[("default", "m-0")]["metadata"]["annotations"][
        "kvpilot.dev/hbm-per-gpu"] == str(21 * 2**30)  # what placement counts
    assert s["selector"] == "app.kubernetes.io/managed-by=kvpilot,kvpilot.dev/model=m"
    assert "reason" not in s  # every desired replica ready
    assert [(c["type"], c["status"]) for c in s["conditions"]] == [
        ("Placed", "True"), ("Ready", "True"), ("Unschedulable", "False"),
        ("Degraded", "False"), ("Spread", "True")]
    assert cond(s, "Spread")["message"] == "spread node: each of 3 replicas on a node of its own"


def test_replicas_that_must_share_a_node_say_why_once():
    # Three replicas, two nodes: the third shares a node (on a GPU of its own there).
    w = World([node("a"), node("b")], [model("m", 3)])
    first = w.step()
    assert w.placements() == {"m-0": ("a", (0,)), "m-1": ("b", (0,)), "m-2": ("a", (1,))}
    spread = cond(w.status("m"), "Spread")
    assert (spread["status"], spread["reason"]) == ("False", "ReplicasShareNode")
    assert spread["message"] == (
        "2 of 3 replicas share a node; spread node: every node with room for another "
        "replica of the Model holds one already (0/2 nodes fit: 2 holding a replica of it)")
    assert [(e["reason"], e["type"], e["message"]) for e in first.events][1:] == [
        ("ReplicasShareNode", "Warning", spread["message"])]
    w.settle()
    assert [e["reason"] for e in w.events].count("ReplicasShareNode") == 1
    # A node joins: the replicas that run stay, and the condition says so.
    w.nodes.append(node("c"))
    w.step()
    assert cond(w.status("m"), "Spread")["message"].startswith(
        "2 of 3 replicas share a node; replicas that run stay where they are")
    # Scaling down takes a replica off the crowded node first.
    w.models[0]["spec"]["replicas"] = 2
    assert w.step().drains == [("default", "m-2")]
    w.step(drained={"default/m-2": True})
    assert cond(w.status("m"), "Spread")["status"] == "True"


def test_spread_gpu_and_none():
    w = World([node("a")], [model("m", 2, placement={"spread": "gpu"}),
                            model("n", 2, placement={"spread": "none"})],
              slices=[gpu_slice("a")], mode="dra")
    w.settle()
    assert w.placements() == {"m-0": ("a", (0,)), "m-1": ("a", (1,)), "n-0": ("a", (0,)),
                              "n-1": ("a", (0,))}
    assert cond(w.status("m"), "Spread")["message"] == (
        "spread gpu: each of 2 replicas on a GPU of its own")
    assert "Spread" not in [c["type"] for c in w.status("n")["conditions"]]


def test_dra_workers_get_the_budget_their_claim_asks():
    w = World([node("a")], [model("m", 1)], slices=[gpu_slice("a")], mode="dra")
    w.settle()
    env = {e["name"]: e.get("value") for e in
           w.pods[("default", "m-0")]["spec"]["containers"][0]["env"]}
    assert env["KVPILOT_HBM_PER_GPU_BYTES"] == str(21 * 2**30)
    assert w.status("m")["kvCapacityTokens"] == 8192 * 4


def test_does_not_fit_is_said_once_not_again_when_only_the_node_tally_changes():
    w = World([node("a", gpus=1)], [model("m", 1, seqs=100)])
    first = w.step()
    assert [e["reason"] for e in first.events] == ["DoesNotFit"]
    assert "(0/1 nodes fit:" in first.events[0]["message"]
    w.nodes.append(node("b", gpus=1))  # one more node of the same kind
    again = w.step()
    assert "(0/2 nodes fit:" in cond(w.status("m"), "Unschedulable")["message"]
    assert w.status("m")["reason"] == "Unschedulable"
    assert [e["reason"] for e in again.events] == []


def test_device_plugin_mode_never_shares_a_gpu():
    w = World([node("a", gpus=4)], [model("m", 2), model("n", 2)])
    w.settle()
    gpus = [g for _, gs in w.placements().values() for g in gs]
    assert sorted(gpus) == [0, 1, 2, 3]


def test_dra_mode_shares_gpus_by_budget_and_claims_the_planned_devices():
    w = World([node("a")], [model("m", 2, placement={"spread": "none"}), model("n", 1)],
              slices=[gpu_slice("a")], mode="dra")
    w.settle()
    # 21 GiB each: three fit one 80 GiB GPU (m packs: spread none).
    assert w.placements() == {"m-0": ("a", (0,)), "m-1": ("a", (0,)), "n-0": ("a", (0,))}
    claim = w.claims[("default", "m-0")]
    (request,) = claim["spec"]["devices"]["requests"]
    assert request["exactly"]["capacity"] == {"requests": {"memory": str(21 * GiB)}}
    assert 'uuid in ["GPU-a-0"]' in request["exactly"]["selectors"][1]["cel"]["expression"]
    assert w.status("m")["placements"][0] == {"replica": "m-0", "node": "a", "gpus": [0],
                                              "shared": True}


def test_scale_down_drains_the_surplus_then_deletes_it_once_drained():
    w = World([node("a", gpus=4)], [model("m", 3)])
    w.settle()
    w.models[0]["spec"]["replicas"] = 1
    actions = w.step()
    assert actions.deletes == []
    assert sorted(actions.drains) == [("default", "m-1"), ("default", "m-2")]
    assert [e["reason"] for e in actions.events] == ["Draining", "Draining"]
    assert w.step().writes == 1  # status: the draining replicas no longer count
    assert w.status("m")["replicas"] == 1
    assert w.step(drained={"default/m-2": False}).writes == 0  # still serving
    actions = w.step(drained={"default/m-1": True})
    assert [(d.kind, d.name) for d in actions.deletes] == [("Pod", "m-1")]
    assert [(e["reason"], e["message"]) for e in actions.events] == [
        ("ReplicaRemoved", "removed replica m-1: drained")]
    actions = w.step(now_s=epoch(NOW) + 60)  # m-2 never drained: the timeout takes it
    assert [(d.kind, d.name) for d in actions.deletes] == [("Pod", "m-2")]
    assert actions.events[0]["reason"] == "DrainTimeout"
    assert actions.events[0]["type"] == "Warning"
    w.settle()
    assert list(w.placements()) == ["m-0"]
    w.models[0]["spec"]["replicas"] = 2
    w.settle()
    assert list(w.placements()) == ["m-0", "m-1"]


def test_a_draining_replica_keeps_its_hbm_until_it_goes():
    w = World([node("a", gpus=1)], [model("m", 3)], slices=[gpu_slice("a", gpus=1)],
              mode="dra")  # one GPU holds three replicas of 21 GiB
    w.settle()
    w.models[0]["spec"]["replicas"] = 2
    w.step()
    w.models.append(model("n", 1))  # would fit in the draining replica's HBM
    w.step()
    assert ("default", "n-0") not in w.pods
    assert cond(w.status("n"), "Unschedulable")["status"] == "True"
    w.step(drained={"default/m-2": True})
    w.settle()
    assert ("default", "n-0") in w.pods


def test_a_replica_that_does_not_serve_is_removed_without_draining():
    w = World([node("a", gpus=4)], [model("m", 2)])
    w.settle()
    w.pods[("default", "m-1")]["status"]["conditions"][0]["status"] = "False"
    w.models[0]["spec"]["replicas"] = 1
    actions = w.step()
    assert (actions.drains, [d.name for d in actions.deletes]) == ([], ["m-1"])


def test_replicas_on_a_lost_node_are_placed_again_elsewhere():
    for lost in (dict(ready=False), dict(taints=[{"key": "x", "effect": "NoExecute"}])):
        w = World([node("a", gpus=1), node("b", gpus=1)], [model("m", 1)])
        w.settle()
        assert w.placements() == {"m-0": ("a", (0,))}
        w.nodes[0] = node("a", gpus=1, **lost)
        actions = w.step()
        assert [(d.kind, d.name) for d in actions.deletes] == [("Pod", "m-0")]
        assert actions.events[0]["reason"] == "ReplicaLost"
        w.settle()
        assert list(w.placements().values()) == [("b", (0,))]


def test_a_cordon_moves_replicas_one_at_a_time_make_before_break():
    w = World([node("a", gpus=2)], [model("m", 2), model("n", 1)])
    w.settle()
    on_a = len(w.placements())
    w.nodes = [node("a", gpus=2, cordoned=True), node("b", gpus=4)]  # maintenance of a
    reasons, serving = [], []
    for _ in range(12):
        draining = {f"{ns}/{name}": True for (ns, name), p in w.pods.items()
                    if "kvpilot.dev/drain-started" in p["metadata"]["annotations"]}
        actions = w.step(drained=draining)
        reasons += [e["reason"] for e in actions.events]
        for model_name, want in (("m", 2), ("n", 1)):
            serving.append(sum(
                1 for p in w.pods.values() if p["metadata"]["labels"]["kvpilot.dev/model"]
                == model_name and "kvpilot.dev/drain-started" not in p["metadata"]["annotations"])
                >= want)
        if actions.writes == 0:
            break
    assert all(serving)  # never fewer serving replicas than wanted
    assert "reason" not in w.status("m")
    assert {n for n, _ in w.placements().values()} == {"b"}
    assert "ReplicaLost" not in reasons and reasons.count("Draining") == on_a
    draining = [e["message"] for e in w.events if e["reason"] == "Draining"]
    assert all(m.startswith("moving off cordoned node a, its replacement Ready") for m in draining)
    assert cond(w.status("m"), "Placed")["message"] == "2 of 2 replicas placed"


def test_a_cordoned_replica_with_nowhere_to_go_keeps_serving_and_says_so():
    w = World([node("a", gpus=1)], [model("m", 1, seqs=16)])
    w.settle()
    w.nodes[0] = node("a", gpus=1, cordoned=True)
    actions = w.step()
    assert actions.deletes == [] and actions.drains == []
    assert list(w.placements()) == ["m-0"]
    placed = cond(w.status("m"), "Placed")
    assert placed["status"] == "True" and placed["message"].startswith(
        "1 of 1 replicas placed; 1 more while a replica moves off a cordoned node (it has "
        "no room yet: ")
    assert cond(w.status("m"), "Unschedulable")["status"] == "False"


def test_a_deleted_node_takes_its_replicas_with_it():
    w = World([node("a", gpus=1), node("b", gpus=1)], [model("m", 2)])
    w.settle()
    w.nodes = [node("b", gpus=1), node("c", gpus=1)]
    actions = w.step()
    assert [d.name for d in actions.deletes] == ["m-0"]
    assert "node is gone" in actions.events[0]["message"]
    w.settle()
    assert sorted(n for n, _ in w.placements().values()) == ["b", "c"]


def test_a_noschedule_taint_keeps_what_runs_and_takes_nothing_new():
    w = World([node("a", gpus=2)], [model("m", 1)])
    w.settle()
    w.nodes[0] = node("a", gpus=2, taints=[{"key": "x", "effect": "NoSchedule"}])
    w.models[0]["spec"]["replicas"] = 2
    actions = w.step()
    assert actions.deletes == [] and actions.creates == []
    assert cond(w.status("m"), "Unschedulable")["status"] == "True"
    # the usual GPU taint is tolerated by worker pods
    w.nodes[0] = node("a", gpus=2, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])
    w.settle()
    assert len(w.placements()) == 2


def test_an_unplaceable_model_gets_the_reason_and_no_pods_and_others_carry_on():
    huge = model("huge", 1, seqs=64, context=131072)  # 1 TiB of KV: fits nowhere
    w = World([node("a")], [huge, model("m", 1)])
    actions = w.step()
    assert replicas_made(actions) == ["m-0"]
    s = w.status("huge")
    u = cond(s, "Unschedulable")
    assert u["status"] == "True" and u["reason"] == "DoesNotFit"
    assert "per GPU" in u["message"]
    assert cond(s, "Placed")["status"] == "False"
    assert [e["reason"] for e in actions.events if e["type"] == "Warning"] == ["DoesNotFit"]
    w.settle()
    assert not [e for e in w.events[len(actions.events):] if e["reason"] == "DoesNotFit"]


def test_a_model_that_cannot_all_be_placed_keeps_what_it_has():
    w = World([node("a", gpus=1)], [model("m", 3)], slices=[gpu_slice("a", gpus=1)],
              mode="dra")  # one 80 GiB GPU holds three at 21 GiB
    w.settle()
    w.models[0]["spec"]["replicas"] = 5
    w.settle()
    assert len(w.placements()) == 3
    s = w.status("m")
    assert cond(s, "Degraded")["status"] == "True"
    assert cond(s, "Placed")["message"] == "3 of 5 replicas placed"
    assert s["replicas"] == 3


def test_dra_counts_memory_held_by_other_workloads():
    other = {"metadata": {"name": "train", "namespace": "x"}, "status": {"allocation": {
        "devices": {"results": [{"driver": "gpu.nvidia.com", "pool": "a", "device": "gpu-0",
                                 "request": "r", "consumedCapacity": {"memory": "70Gi"}}]}}}}
    w = World([node("a")], [model("m", 1)], slices=[gpu_slice("a")], foreign_claims=[other],
              mode="dra")
    v = w.view()
    assert [(e.model, e.node, e.gpus, e.hbm_per_gpu) for e in v.snapshot.replicas] == [
        (FOREIGN, "a", (0,), 70 * GiB)]
    w.settle()
    assert w.placements() == {"m-0": ("a", (1,))}


def test_claims_allocated_by_the_scheduler_override_the_planned_gpus():
    w = World([node("a")], [model("m", 1)], slices=[gpu_slice("a")], mode="dra")
    w.settle()
    w.claims[("default", "m-0")]["status"] = {"allocation": {"devices": {"results": [
        {"driver": "gpu.nvidia.com", "pool": "a", "device": "gpu-1", "request": "gpu"}]}}}
    (e,) = w.view().snapshot.replicas
    assert (e.node, e.gpus) == ("a", (1,))


def test_a_claim_without_its_pod_gets_the_pod_and_nothing_else():
    """Killed between creating a replica's claim and its pod: the next pass finishes it."""
    w = World([node("a")], [model("m", 1)], slices=[gpu_slice("a")], mode="dra")
    w.settle()
    del w.pods[("default", "m-0")]
    actions = w.step()
    assert [(o["kind"], o["metadata"]["name"]) for o in actions.creates] == [("Pod", "m-0")]


def _finish(w: World, passes: int = 12) -> None:
    """Passes until nothing is left to write, every drain reported done."""
    for _ in range(passes):
        draining = {f"{ns}/{name}": True for (ns, name), p in w.pods.items()
                    if "kvpilot.dev/drain-started" in p["metadata"]["annotations"]}
        if w.step(drained=draining).writes == 0:
            return
    raise AssertionError("the world did not settle")


def test_an_operator_killed_at_any_write_of_a_rollout_leaves_every_replica_on_its_spec():
    """Every prefix of every pass of a rollout (concurrentSequences 3 -> 16), then an
    operator that carries on: each pod ends on a claim of its own spec and budget."""
    def world() -> World:
        w = World([node("a", gpus=4), node("b", gpus=4)], [model("m", 2, seqs=3)],
                  slices=[gpu_slice("a", 4), gpu_slice("b", 4)], mode="dra")
        w.settle()
        w.models[0]["spec"]["sla"]["concurrentSequences"] = 16
        return w

    reference = world()
    _finish(reference)
    budget = {p["metadata"]["annotations"]["kvpilot.dev/hbm-per-gpu"]
              for p in reference.pods.values()}
    assert len(budget) == 1 and len(reference.pods) == 2
    crashes = 0
    for passes in range(1, 7):  # crash in pass `passes`, after `k` of its writes
        for k in range(8):
            w = world()
            for _ in range(passes - 1):
                draining = {f"{ns}/{n}": True for (ns, n), p in w.pods.items()
                            if "kvpilot.dev/drain-started" in p["metadata"]["annotations"]}
                w.step(drained=draining)
            w.step(crash_after=k)
            crashes += 1
            _finish(w)
            current = reference.pods[next(iter(reference.pods))]["metadata"][
                "annotations"]["kvpilot.dev/spec-hash"]
            assert len(w.pods) == 2 and set(w.pods) == set(w.claims), (passes, k)
            for key, pod in w.pods.items():
                claim = w.claims[key]["metadata"]["annotations"]
                assert pod["metadata"]["annotations"]["kvpilot.dev/spec-hash"] == current
                assert claim["kvpilot.dev/spec-hash"] == current, (passes, k, key)
                assert {claim["kvpilot.dev/hbm-per-gpu"]} == budget, (passes, k, key)
    assert crashes == 48


def test_a_claim_left_from_an_older_spec_is_replaced_not_reused():
    """The reported case: the pod deleted, the operator killed before the claim: the
    claim is not given a pod of the new spec."""
    w = World([node("a", gpus=2)], [model("m", 1, seqs=3)], slices=[gpu_slice("a")],
              mode="dra")
    w.settle()
    w.models[0]["spec"]["sla"]["concurrentSequences"] = 16
    del w.pods[("default", "m-0")]
    actions = w.step()
    assert [(d.kind, d.name) for d in actions.deletes] == [("ResourceClaim", "m-0")]
    assert replicas_made(actions) == ["m-1", "m-1"]  # claim and pod, at the new budget
    assert [e["reason"] for e in actions.events][:1] == ["Replacing"]
    _finish(w)
    (claim,) = w.claims.values()
    assert claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"]["requests"][
        "memory"] == w.pods[("default", "m-1")]["metadata"]["annotations"][
        "kvpilot.dev/hbm-per-gpu"]


def test_pods_of_a_deleted_model_are_removed_and_a_deleting_model_is_emptied():
    w = World([node("a")], [model("m", 2), model("n", 1)])
    w.settle()
    w.models[0]["metadata"]["deletionTimestamp"] = NOW
    actions = w.step()
    assert sorted(d.name for d in actions.deletes) == ["m-0", "m-1"]
    assert all(ns != "default" or name != "m" for ns, name, _ in actions.statuses)
    w.models = [w.models[1]]
    w.pods[("default", "m-9")] = copy.deepcopy(w.pods[("default", "n-0")])
    w.pods[("default", "m-9")]["metadata"].update(
        name="m-9", labels={**w.pods[("default", "n-0")]["metadata"]["labels"],
                            "kvpilot.dev/model": "m"})
    assert [d.name for d in w.step().deletes] == ["m-9"]


def test_models_of_the_same_name_in_two_namespaces_do_not_mix():
    w = World([node("a", gpus=4)], [model("m", 1, ns="x"), model("m", 2, ns="y")])
    w.settle()
    assert sorted(w.pods) == [("x", "m-0"), ("y", "m-0"), ("y", "m-1")]


def test_an_invalid_stored_spec_is_reported_and_its_replicas_kept():
    w = World([node("a")], [model("m", 1), model("n", 1)])
    w.settle()
    w.models[0]["spec"]["sla"]["contextTokens"] = 10**9  # beyond maxContextTokens
    actions = w.step()
    assert actions.deletes == []
    s = w.status("m")
    assert [(c["type"], c["status"], c["reason"]) for c in s["conditions"]] == [
        ("Degraded", "True", "InvalidSpec")]
    assert "contextTokens" in s["conditions"][0]["message"]
    assert len(w.placements()) == 2


def test_dra_auto_detection_and_product_names():
    assert dra_available([gpu_slice("a")], "gpu.nvidia.com")
    assert not dra_available([gpu_slice("a", shared=False)], "gpu.nvidia.com")
    assert not dra_available([gpu_slice("a")], "other.driver")
    assert dra_product("NVIDIA H100 80GB HBM3") == H100


def test_a_model_the_worker_cannot_serve_gets_a_condition_and_no_pods():
    phi = model("phi", 1)
    phi["spec"]["architecture"]["headDim"] = 112  # accepted; no worker kernel takes it
    w = World([node("a")], [phi, model("m", 1)])
    w.settle()
    assert list(w.placements()) == ["m-0"]
    (c,) = w.status("phi")["conditions"]
    assert (c["type"], c["status"], c["reason"]) == ("Degraded", "True", "WorkerUnsupported")
    assert "headDim 112" in c["message"]
    assert w.status("phi")["reason"] == "WorkerUnsupported"


def test_latent_attention_gets_a_condition_and_no_pods_and_a_window_is_served():
    window, latent = model("window", 1), model("latent", 1)
    window["spec"]["architecture"]["slidingWindow"] = {"tokens": 4096}  # Mistral-7B v0.1
    latent["spec"]["architecture"].update(  # DeepSeek-V2-Lite's latent on this shape
        attention="mla", kvHeads=32, mla={"kvLoraRank": 512, "qkRopeHeadDim": 64})
    w = World([node("a")], [window, latent, model("m", 1)])
    w.settle()
    assert sorted(w.placements()) == ["m-0", "window-0"]
    (c,) = w.status("latent")["conditions"]
    assert (c["type"], c["status"], c["reason"]) == ("Degraded", "True", "WorkerUnsupported")
    assert "architecture.attention mla" in c["message"]


def test_tp_auto_resolves_to_a_replica_on_several_gpus_when_one_is_too_small():
    big = model("big", 1, seqs=16, context=65536)  # 15 + 128 GiB + 2: needs TP 2 on H100s
    w = World([node("a")], [big])
    w.settle()
    pod = w.pods[("default", "big-0")]
    assert pod["metadata"]["annotations"]["kvpilot.dev/gpus"] == "0,1"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["KVPILOT_TENSOR_PARALLEL"] == "2"


def test_a_spec_change_replaces_replicas_one_at_a_time_through_a_drain():
    w = World([node("a", gpus=4)], [model("m", 2)])
    w.settle()
    w.models[0]["spec"]["worker"] = {"engineArgs": ["--max-num-seqs", "8"]}
    actions = w.step()
    assert actions.drains == [("default", "m-0")]
    assert [e["reason"] for e in actions.events][:2] == ["Replacing", "Placed"]
    assert replicas_made(actions) == ["m-2"]
    assert w.pods[("default", "m-2")]["spec"]["containers"][0]["args"][-2:] == [
        "--max-num-seqs", "8"]
    assert w.step().drains == []  # one at a time: m-1 waits while m-0 drains
    w.step(drained={"default/m-0": True})
    actions = w.step()
    assert actions.drains == [("default", "m-1")]
    w.step(drained={"default/m-1": True})
    w.settle()
    assert list(w.placements()) == ["m-0", "m-2"]  # m-0's name was free again
    assert all(p["spec"]["containers"][0]["args"][-2:] == ["--max-num-seqs", "8"]
               for p in w.pods.values())


MISMATCH = ("WeightsMismatch: the checkpoint at /weights disagrees with Model m: "
            "architecture.layers: the Model says 32, config.json says 2")


def crash_loop(pod: dict, message: str = MISMATCH, container: str = "worker") -> None:
    """What the kubelet reports of a container that exits at start, again and again."""
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    key = "initContainerStatuses" if container == "fetch-weights" else "containerStatuses"
    pod["status"][key] = [{"name": container, "restartCount": 4,
                           "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                           "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                        "message": message}}}]


def test_every_model_gets_one_service_and_its_endpoint_once_the_service_exists():
    w = World([node("a")], [model("m", 1), model("n", 1, ns="other")])
    first = w.step()
    services = [o for o in first.creates if o["kind"] == "Service"]
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in services] == [
        ("default", "m"), ("other", "n")]
    assert "endpoint" not in w.status("m")  # the Service is not there yet
    w.settle()
    assert w.status("m")["endpoint"] == "http://m.default.svc/v1"
    assert w.status("n")["endpoint"] == "http://n.other.svc/v1"
    assert w.step().writes == 0


def test_a_crash_looping_replica_shows_its_reason_on_the_model_with_one_event():
    w = World([node("a")], [model("m", 2)])
    w.settle()
    crash_loop(w.pods[("default", "m-1")])
    actions = w.step()
    degraded = cond(w.status("m"), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "WeightsMismatch")
    assert degraded["message"] == (
        "replica m-1: the checkpoint at /weights disagrees with Model m: architecture.layers: "
        "the Model says 32, config.json says 2")
    assert cond(w.status("m"), "Ready")["message"] == "1 of 2 replicas ready"
    assert w.status("m")["reason"] == "WeightsMismatch"
    assert [(e["reason"], e["type"]) for e in actions.events] == [
        ("WeightsMismatch", "Warning")]
    assert w.step().writes == 0  # the same failure: no second event
    crash_loop(w.pods[("default", "m-0")], "WeightsUnavailable: hub refused access (401)",
               "fetch-weights")
    w.step()
    degraded = cond(w.status("m"), "Degraded")
    assert (degraded["reason"], degraded["message"]) == (
        "WeightsUnavailable", "replica m-0: hub refused access (401) (and 1 more replica(s) "
        "failing)")


def test_a_fixed_spec_replaces_every_failing_replica_at_once():
    w = World([node("a", gpus=4)], [model("m", 2)])
    w.settle()
    for key in (("default", "m-0"), ("default", "m-1")):
        crash_loop(w.pods[key])
    w.step()
    w.models[0]["spec"]["weights"] = {"bytes": "14Gi"}  # the user fixes the Model
    actions = w.step()
    assert actions.drains == []
    assert [(d.kind, d.name) for d in actions.deletes] == [("Pod", "m-0"), ("Pod", "m-1")]
    assert replicas_made(actions) == ["m-2", "m-3"]
    assert [e["reason"] for e in actions.events].count("Replacing") == 2
    w.settle()
    assert list(w.placements()) == ["m-2", "m-3"]
    assert cond(w.status("m"), "Degraded")["status"] == "False"


def test_fetching_weights_is_said_while_replicas_are_not_ready():
    w = World([node("a")], [model("m", 1, source="hf://org/tiny")])
    w.settle()
    pod = w.pods[("default", "m-0")]
    assert pod["spec"]["initContainers"][0]["args"][:1] == ["hf://org/tiny"]
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    pod["status"]["initContainerStatuses"] = [{"name": "fetch-weights", "restartCount": 0,
                                               "state": {"running": {"startedAt": NOW}}}]
    w.step()
    assert cond(w.status("m"), "Ready")["message"] == "0 of 1 replicas ready (1 fetching weights)"
    assert w.status("m")["reason"] == "FetchingWeights"
    assert cond(w.status("m"), "Degraded")["status"] == "False"


def test_scaling_alone_replaces_nothing():
    w = World([node("a", gpus=4)], [model("m", 2)])
    w.settle()
    w.models[0]["spec"]["replicas"] = 3
    w.models[0]["spec"]["maxReplicas"] = 5
    w.settle()
    assert list(w.placements()) == ["m-0", "m-1", "m-2"]


def test_a_node_notready_for_a_moment_keeps_its_replicas_and_takes_nothing_new():
    w = World([node("a", gpus=2), node("b", gpus=2)], [model("m", 1)])
    w.settle()
    assert w.placements() == {"m-0": ("a", (0,))}
    w.nodes[0] = node("a", gpus=2, ready=False, since=NOW,
                      taints=[{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}])
    w.models[0]["spec"]["replicas"] = 2
    actions = w.step(now_s=epoch(NOW) + 30)  # 30 s of the 60 s grace
    assert actions.deletes == []
    assert w.placements() == {"m-0": ("a", (0,)), "m-1": ("b", (0,))}
    actions = w.step(now_s=epoch(NOW) + 61)  # past the grace: placed elsewhere
    assert [d.name for d in actions.deletes] == ["m-0"]
    assert "node is NotReady" in actions.events[0]["message"]


def test_a_node_states_the_bandwidth_of_a_product_the_catalog_does_not_know():
    acme = node("x", product="ACME-X1", mib=65536)
    acme["metadata"]["labels"]["kvpilot.dev/gpu.bandwidth-gbps"] = "2000"
    (n,) = World([acme], []).view().snapshot.nodes
    assert (n.product, n.bandwidth_gbps, n.bf16_tflops) == ("ACME-X1", 2000, None)
    s = gpu_slice("x", product="ACME X1")
    w = World([acme], [], slices=[s], mode="dra")
    (n,) = w.view().snapshot.nodes
    assert (n.product, n.bandwidth_gbps) == ("ACME-X1", 2000)


def test_a_node_takes_its_allocatable_pods_less_the_reserve_in_replicas():
    # 17 GiB replicas, four to a GPU: a's two GPUs would hold all six. a allows 12 pods,
    # 10 of them kept for other workloads: two replicas go there, the rest to b.
    a, b = node("a"), node("b")
    a["status"]["allocatable"]["pods"] = "12"
    w = World([a, b], [model("m", 6, seqs=1, context=1024)],
              slices=[gpu_slice("a"), gpu_slice("b")], mode="dra")
    w.view = lambda now_s=None: cluster_view(w.nodes, w.slices, list(w.pods.values()),
                                             list(w.claims.values()), w.mode,
                                             reserved_pods=10,
                                             services=list(w.services.values()))
    assert [n.max_pods for n in w.view().snapshot.nodes] == [2, None]
    w.settle()
    assert sorted(n for n, _ in w.placements().values()) == ["a", "a", "b", "b", "b", "b"]


def test_only_changes_placement_reads_change_a_signature():
    from kvpilot.operator.view import signature

    n = node("a")
    beat = copy.deepcopy(n)
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = NOW
    beat["metadata"]["resourceVersion"] = "2"
    assert signature("Node", beat) == signature("Node", n)
    fewer_pods = node("a")
    fewer_pods["status"]["allocatable"]["pods"] = "20"
    for changed in (node("a", ready=False), node("a", cordoned=True), node("a", gpus=1),
                    node("a", taints=[{"key": "x", "effect": "NoSchedule"}]), fewer_pods):
        assert signature("Node", changed) != signature("Node", n)
    w = World([node("a")], [model("m", 1)])
    w.settle()
    pod = w.pods[("default", "m-0")]
    later = copy.deepcopy(pod)
    later["status"]["conditions"][0]["lastProbeTime"] = NOW
    assert signature("Pod", later) == signature("Pod", pod)
    later["metadata"]["annotations"]["kvpilot.dev/drain-started"] = NOW
    assert signature("Pod", later) != signature("Pod", pod)


def test_the_indexes_keep_enough_of_each_object_to_plan_alike():
    from kvpilot.operator.view import cluster_view, trimmed

    other = {"metadata": {"name": "train", "namespace": "x"}, "status": {"allocation": {
        "devices": {"results": [{"driver": "gpu.nvidia.com", "pool": "a", "device": "gpu-1",
                                 "request": "r", "consumedCapacity": {"memory": "10Gi"}}]}}}}
    w = World([node("a", taints=[{"key": "x", "effect": "NoSchedule"}]), node("b")],
              [model("m", 3)], slices=[gpu_slice("a"), gpu_slice("b")], mode="dra",
              foreign_claims=[other])
    w.settle()
    w.models[0]["spec"]["replicas"] = 2
    w.step()  # one replica drains
    full = w.view()
    small = cluster_view([trimmed("Node", n) for n in w.nodes], w.slices,
                         [trimmed("Pod", p) for p in w.pods.values()],
                         [trimmed("ResourceClaim", c) for c in [*w.claims.values(), other]],
                         "dra")
    assert small.snapshot == full.snapshot
    assert small.devices == full.devices
    assert {k: (r.ready, r.ip, r.drain_started, r.spec_hash) for k, r in small.replicas.items()} \
        == {k: (r.ready, r.ip, r.drain_started, r.spec_hash) for k, r in full.replicas.items()}
    pod = next(iter(w.pods.values()))
    assert "containers" not in trimmed("Pod", pod)["spec"]  # the env with the Model spec


def _gauge(gauge, name: str) -> float:
    return gauge.labels("default", name)._value.get()


def test_metrics_count_desired_and_unplaced_of_models_the_worker_cannot_serve_too():
    from kvpilot.operator import metrics
    from kvpilot.operator.runner import Fleet, Indexes, PassResult
    from kvpilot.operator.settings import Settings

    phi = model("phi", 3)
    phi["spec"]["architecture"]["headDim"] = 112  # planned, but no worker serves it
    w = World([node("a", gpus=1)], [phi, model("m", 2)])
    w.settle()
    view = w.view()
    actions = reconcile(w.models, view, Config(mode=w.mode), NOW)
    Fleet(kube=None, settings=Settings(), indexes=Indexes()).observe(
        PassResult(actions, w.mode, 0.01, view), w.models)
    assert (_gauge(metrics.DESIRED, "phi"), _gauge(metrics.UNPLACED, "phi")) == (3, 3)
    # m: two wanted, one GPU: one placed and one not
    assert (_gauge(metrics.DESIRED, "m"), _gauge(metrics.UNPLACED, "m")) == (2, 1)
    assert _gauge(metrics.ACTUAL, "m") == 1


def test_one_replica_has_none_to_keep_apart():
    w = World([node("a")], [model("m", 1)])
    w.settle()
    spread = cond(w.status("m"), "Spread")
    assert (spread["status"], spread["message"]) == (
        "True", "spread node: 1 replica, none to keep apart")
