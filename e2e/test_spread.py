"""Spread on the real control plane: the replicas of a Model that spreads by node are
bound to distinct nodes by the real kube-scheduler, and their claims are allocated on
GPUs of those nodes; those of a Model that packs share one GPU. One replica more than
there are nodes shares a node, and the Model says so.

DRA mode, three KWOK nodes with two H100s each, published as ResourceSlices; the
evidence is what the API server holds: each pod's ``spec.nodeName`` (the scheduler's
binding), each claim's allocation, the Model's status and Events.
"""

from __future__ import annotations

from collections import Counter

import pytest

from kvpilot.api.fleet import FleetNode

from e2e.conftest import ROOT
from e2e.fleet import fleet_cluster
from e2e.operator import OperatorProcess, wait_for
from e2e.fleet import H100, SMALL, model
from e2e.state import allocated, check_consistent, condition, events, model_status, running

FLEET = [FleetNode(name=f"h100-{i}", product=H100, gpus=2, gpu_memory_mib=81559)
         for i in range(3)]
# SMALL is 3.4 GiB a replica: packed, three share one GPU.


def spread_model(name: str, replicas: int, spread: str) -> dict:
    m = model(name, replicas, **SMALL)
    m["spec"]["placement"] = {"spread": spread}
    return m


@pytest.fixture(scope="module")
def spread_cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("spread-cluster"), FLEET, dra=True,
                       crds=ROOT / "crds") as c:
        yield c


def bound(reps: dict, model_name: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Replica -> (node the scheduler bound its pod to, devices allocated to its claim)."""
    out = {}
    for name, r in reps.items():
        if r["pod"]["metadata"]["labels"]["kvpilot.dev/model"] != model_name:
            continue
        devices = allocated(r["claim"])
        assert {pool for pool, _, _ in devices} == {r["pod"]["spec"]["nodeName"]}, name
        out[name] = (r["pod"]["spec"]["nodeName"], tuple(sorted(d for _, d, _ in devices)))
    return out


def test_replicas_that_spread_by_node_are_bound_to_distinct_nodes(spread_cluster, tmp_path):
    with OperatorProcess(spread_cluster, tmp_path / "operator.log") as op:
        spread_cluster.apply([spread_model("apart", 3, "node"),
                              spread_model("packed", 3, "none")])
        want = {"apart": 3, "packed": 3}
        reps = wait_for("6 replicas bound and allocated", lambda: running(spread_cluster, want),
                        90, log=op.log)
        check_consistent(spread_cluster, reps)  # each pod bound where planned, claims too
        apart = bound(reps, "apart")
        assert sorted(node for node, _ in apart.values()) == ["h100-0", "h100-1", "h100-2"]
        packed = bound(reps, "packed")
        assert len(set(packed.values())) == 1, packed  # one node, one GPU
        status = wait_for("Spread condition", lambda: (s := model_status(spread_cluster, "apart"))
                          and condition(s, "Spread").get("status") == "True" and s, 30,
                          log=op.log)
        assert condition(status, "Spread")["message"] == (
            "spread node: each of 3 replicas on a node of its own")
        assert "Spread" not in [c["type"] for c in
                                model_status(spread_cluster, "packed").get("conditions", [])]

        # A fourth replica: three nodes, so it shares one (and packs there).
        spread_cluster.kubectl("scale", "model/apart", "--replicas=4")
        want["apart"] = 4
        reps = wait_for("4 replicas of apart", lambda: running(spread_cluster, want), 90,
                        log=op.log)
        check_consistent(spread_cluster, reps)
        apart = bound(reps, "apart")
        assert sorted(Counter(node for node, _ in apart.values()).values()) == [1, 1, 2], apart
        status = wait_for("Spread False", lambda: (s := model_status(spread_cluster, "apart"))
                          and condition(s, "Spread").get("status") == "False" and s, 30,
                          log=op.log)
        spread = condition(status, "Spread")
        assert spread["reason"] == "ReplicasShareNode"
        assert spread["message"].startswith(
            "2 of 4 replicas share a node; spread node: every node with room for another "
            "replica of the Model holds one already (0/3 nodes fit: 3 holding a replica of "
            "it)"), spread["message"]
        warned = [e for e in events(spread_cluster, "apart") if e["reason"] == "ReplicasShareNode"]
        assert len(warned) == 1 and warned[0]["type"] == "Warning"
