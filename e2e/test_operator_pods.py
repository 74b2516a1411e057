"""A node's pod limit on the real control plane: the operator never plans more replicas
onto a node than its allocatable pods (less the reserve) admit, and the kube-scheduler,
which enforces that limit itself, binds every pod it creates."""

from __future__ import annotations

from collections import Counter

import pytest

from kvpilot.api.fleet import FleetNode

from e2e.conftest import ROOT
from e2e.fleet import fleet_cluster
from e2e.operator import OperatorProcess, wait_for
from e2e.fleet import SELECTOR, model

H100 = "NVIDIA-H100-80GB-HBM3"
# One GPU each, admitting three pods each. Five 3.4 GiB replicas would share one GPU.
FLEET = [FleetNode(name=f"h100-{i}", product=H100, gpus=1, gpu_memory_mib=81559, max_pods=3)
         for i in range(2)]
SMALL = model("small", 5, weights="1Gi", layers=24, kv_heads=2, head_dim=64, context=4096,
              seqs=8)


@pytest.fixture(scope="module")
def pods_cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("pods-cluster"), FLEET, dra=True,
                       crds=ROOT / "crds") as c:
        yield c


def test_replicas_stay_within_each_nodes_pods_and_all_are_bound(pods_cluster, tmp_path):
    # No pods are reserved for other workloads here: a node may take all three.
    with OperatorProcess(pods_cluster, tmp_path / "operator.log",
                         reserved_pods_per_node=0) as op:
        pods_cluster.apply([SMALL])

        def bound():
            pods = pods_cluster.get("pods", "-l", SELECTOR)["items"]
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return running if len(pods) == len(running) == 5 else None

        pods = wait_for("5 pods running", bound, 90, log=op.log)
        # The scheduler bound each pod where the plan put it, three and two.
        for p in pods:
            assert p["spec"]["nodeName"] == p["metadata"]["annotations"]["kvpilot.dev/node"]
        assert sorted(Counter(p["spec"]["nodeName"] for p in pods).values()) == [2, 3]
