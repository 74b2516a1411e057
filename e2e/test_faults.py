"""The operator under faults (issue #29), on the real control plane with stand-in workers:
the API server restarted in the middle of a rollout and etcd restarted under a scale-down
(the operator stays up, resumes and ends on the spec with no duplicate or orphan pod or
claim), workers whose /metrics hang, drip, answer garbage or 10 MB (the Model's other
replicas still scale), and a node that flaps NotReady/Ready every few seconds (no replica
moves within the grace).

No timing assertions beyond generous waits for an outcome."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from e2e.cluster import KWOK_NODE_ANNOTATION
from e2e.fake_workers import MISBEHAVIOURS
from e2e.fleet import SMALL, autoscaled, model
from e2e.operator import OperatorProcess, operator_writes, wait_for
from e2e.state import live, objects, replicas, running

SCRAPE = 1.0
GRACE = 60  # not_ready_grace_seconds: far longer than any flap here


@pytest.fixture(scope="module")
def operator(dra_cluster, tmp_path_factory):
    op = OperatorProcess(dra_cluster, tmp_path_factory.mktemp("op") / "operator.log",
                         scrape_seconds=SCRAPE, not_ready_grace_seconds=GRACE)
    op.start()
    yield op
    op.stop()


def alive(op: OperatorProcess) -> None:
    assert op.proc is not None and op.proc.poll() is None, (
        f"the operator exited ({op.proc.returncode}):\n{op.log()[-4000:]}")


def settled(cluster, want: dict[str, int]) -> dict:
    """The replicas once ``want`` run, every pod with its claim and no claim without its
    pod, held for a few passes."""
    reps = wait_for(f"replicas {want}", lambda: running(cluster, want, others=True), 120)
    time.sleep(4)  # two passes more: nothing may change
    again = running(cluster, want, others=True)
    assert again is not None and set(again) == set(reps)
    names = {kind: {o["metadata"]["name"] for o in objects(cluster, kind)
                    if not o["metadata"].get("deletionTimestamp")
                    and o["metadata"]["labels"]["kvpilot.dev/model"] in want}
             for kind in ("pods", "resourceclaims")}
    assert names["pods"] == names["resourceclaims"] == set(reps)
    return reps


def test_an_api_server_restart_mid_rollout_and_an_etcd_restart_are_survived(
        dra_cluster, operator, fakes):
    dra_cluster.apply([model("outage", 6, **SMALL)])
    wait_for("the rollout under way", lambda: live(dra_cluster, "outage"), 60,
             interval=0.05, log=operator.log)
    dra_cluster.restart("kube-apiserver", down_seconds=8)  # longer than the Lease (3 s)
    settled(dra_cluster, {"outage": 6})
    alive(operator)

    dra_cluster.kubectl("scale", "model/outage", "--replicas=3")
    time.sleep(0.5)
    dra_cluster.restart("etcd", down_seconds=8)
    wait_for("the API server serving again", lambda: dra_cluster.kubectl(
        "get", "models", check=False).returncode == 0, 60)
    settled(dra_cluster, {"outage": 3})
    alive(operator)

    dra_cluster.kubectl("delete", "model", "outage", "--wait=false")
    wait_for("the Model, its pods and claims gone", lambda: not any(
        (r.get("pod") or r.get("claim"))["metadata"]["labels"]["kvpilot.dev/model"] == "outage"
        for r in replicas(dra_cluster).values()) and dra_cluster.kubectl(
        "get", "model", "outage", check=False).returncode != 0, 90, log=operator.log)
    alive(operator)


def test_workers_whose_metrics_misbehave_leave_the_other_replicas_scaling(
        dra_cluster, operator, fakes):
    names = {how: f"scrape-{how}" for how in MISBEHAVIOURS}
    for how, name in names.items():
        fakes.set(name, pressure=0.5)
        fakes.misbehave(f"{name}-0", how)
        dra_cluster.apply([autoscaled(name, replicas=2)])
    wait_for("two workers per Model", lambda: all(
        {f"{n}-0", f"{n}-1"} <= set(fakes.workers) for n in names.values()), 90,
        log=operator.log)
    for name in names.values():
        # The broken replica counts as empty (autoscale): the one that answers has
        # requests waiting, which asks for more replicas whatever the pressure.
        fakes.set(name, pressure=0.95, waiting=5)
    wait_for("every Model scaled up past its broken replica", lambda: all(
        len(live(dra_cluster, n)) == 3 for n in names.values()), 90, log=operator.log)
    alive(operator)
    for name in names.values():
        fakes.misbehave(f"{name}-0", None)
        dra_cluster.kubectl("delete", "model", name, "--wait=false")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _set_ready(cluster, node: str, ready: bool, pods: list[str]) -> None:
    """What a kubelet posts: the node's Ready condition with a transition now, and, once
    Ready again, its pods Ready again."""
    now = _now()
    status = "True" if ready else "False"
    cluster.kubectl("patch", "node", node, "--subresource=status", "--type=strategic",
                    "-p", '{"status": {"conditions": [{"type": "Ready", "status": "%s", '
                    '"reason": "Flap", "message": "flapping", "lastHeartbeatTime": "%s", '
                    '"lastTransitionTime": "%s"}]}}' % (status, now, now))
    if ready:
        for pod in pods:
            cluster.kubectl("patch", "pod", pod, "--subresource=status", "--type=strategic",
                            "-p", '{"status": {"conditions": [{"type": "Ready", "status": '
                            '"True"}, {"type": "ContainersReady", "status": "True"}]}}',
                            check=False)


def test_a_flapping_node_keeps_its_replicas_within_the_grace(dra_cluster, operator):
    dra_cluster.apply([model("flap", 2, **SMALL)])
    reps = settled(dra_cluster, {"flap": 2})
    node = reps["flap-0"]["pod"]["spec"]["nodeName"]
    uids = {n: r["pod"]["metadata"]["uid"] for n, r in reps.items()}
    on_node = [n for n, r in reps.items() if r["pod"]["spec"]["nodeName"] == node]
    # The test plays the node's kubelet: KWOK lets go of it.
    dra_cluster.kubectl("annotate", "node", node, f"{KWOK_NODE_ANNOTATION}-")
    writes = len(operator_writes(dra_cluster))
    try:
        ends = time.monotonic() + 30  # half the grace, ten flaps
        while time.monotonic() < ends:
            _set_ready(dra_cluster, node, False, on_node)
            time.sleep(1.5)
            _set_ready(dra_cluster, node, True, on_node)
            time.sleep(1.5)
        time.sleep(4)  # two passes after the last flap
        now = {n: p["metadata"]["uid"] for n, p in (
            (p["metadata"]["name"], p) for p in objects(dra_cluster, "pods"))
            if n.startswith("flap-") and not p["metadata"].get("deletionTimestamp")}
        assert now == uids, "replicas moved off a node flapping within its grace"
        churn = [w for w in operator_writes(dra_cluster)[writes:]
                 if w["verb"] in ("create", "delete")
                 and w["objectRef"].get("resource") in ("pods", "resourceclaims")]
        assert not churn, [(w["verb"], w["objectRef"].get("name")) for w in churn]
        alive(operator)
    finally:
        _set_ready(dra_cluster, node, True, on_node)
        dra_cluster.kubectl("annotate", "node", node, f"{KWOK_NODE_ANNOTATION}=fake",
                            "--overwrite")
        dra_cluster.kubectl("delete", "model", "flap", "--wait=false")
