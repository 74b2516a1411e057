"""The operator on the real control plane, device-plugin mode: whole ``nvidia.com/gpu``
per replica on the planned node, no GPU shared, the kube-scheduler binding the pods."""

from __future__ import annotations

from collections import Counter

import pytest

from kvpilot.api.fleet import FleetNode

from e2e.conftest import ROOT
from e2e.fleet import fleet_cluster
from e2e.operator import OperatorProcess, wait_for
from e2e.fleet import LLAMA, MISTRAL, QWEN, SELECTOR, model
from e2e.state import condition, model_status

FLEET = [FleetNode(name="h100-0", product="NVIDIA-H100-80GB-HBM3", gpus=4,
                   gpu_memory_mib=81559),
         FleetNode(name="l4-0", product="NVIDIA-L4", gpus=2, gpu_memory_mib=23034)]


@pytest.fixture(scope="module")
def dp_cluster(tmp_path_factory):
    with fleet_cluster(tmp_path_factory.mktemp("dp-cluster"), FLEET, crds=ROOT / "crds") as c:
        yield c


def test_whole_gpus_on_the_planned_nodes_and_nothing_shared(dp_cluster, tmp_path):
    with OperatorProcess(dp_cluster, tmp_path / "operator.log") as op:
        dp_cluster.apply([LLAMA, QWEN, MISTRAL])
        want = {"llama": 2, "qwen": 3, "mistral": 1}

        def settled():
            pods = [p for p in dp_cluster.get("pods", "-l", SELECTOR)["items"]
                    if p["status"].get("phase") == "Running"]
            got = Counter(p["metadata"]["labels"]["kvpilot.dev/model"] for p in pods)
            return pods if dict(got) == want else None

        pods = wait_for("6 pods running", settled, 90, log=op.log)
        seats = Counter()
        for p in pods:
            ann = p["metadata"]["annotations"]
            assert p["spec"]["nodeName"] == ann["kvpilot.dev/node"]  # the scheduler agreed
            (c,) = p["spec"]["containers"]
            tp = int(ann["kvpilot.dev/tensor-parallel"])
            assert c["resources"]["limits"]["nvidia.com/gpu"] in (tp, str(tp))
            assert "resourceClaims" not in p["spec"]
            for g in ann["kvpilot.dev/gpus"].split(","):
                seats[(p["spec"]["nodeName"], g)] += 1
        assert max(seats.values()) == 1  # no GPU shared in this mode
        # Qwen fits an L4 (23 GiB); Llama's 21 GiB does too: six whole GPUs are needed.
        assert len(seats) == 6

        status = wait_for("mistral ready", lambda: (s := model_status(dp_cluster, "mistral"))
                          .get("readyReplicas") == 1 and s, 30, log=op.log)
        assert status["placements"][0]["shared"] is False

        dp_cluster.apply([model("more", 1)])  # no whole GPU is left
        more = wait_for("more unschedulable", lambda: condition(
            model_status(dp_cluster, "more"), "Unschedulable").get("status") == "True"
            and model_status(dp_cluster, "more"), 30, log=op.log)
        assert condition(more, "Placed")["message"] == "0 of 1 replicas placed"
