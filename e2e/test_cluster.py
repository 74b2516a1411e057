"""The local control plane itself: real API server, version, GPU nodes, loopback pod IPs."""

from __future__ import annotations

import json
import time

from kvpilot.api.fleet import FleetNode

from e2e import build
from e2e.fleet import create_fleet, create_nodes, pod_cidr
from e2e.conftest import ROOT


def test_version_is_the_built_one(cluster):
    with cluster.http() as client:
        version = client.get("/version").json()
    assert version["gitVersion"] == build.KUBERNETES_VERSION
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == build.KUBERNETES_VERSION


def test_fleet_nodes_carry_gfd_labels_and_gpu_capacity(cluster):
    names = create_fleet(cluster, ROOT / "examples" / "fleets" / "mixed.yaml")
    assert names == ["h100-0", "h100-1", "a100", "l4-0", "l4-1"]
    node = cluster.get("node", "h100-1")
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    l4 = cluster.get("node", "l4-0")
    assert l4["status"]["capacity"]["nvidia.com/gpu"] == "1"


def test_pod_on_fake_gpu_node_runs_with_loopback_ip(cluster):
    create_nodes(cluster, [FleetNode(name="gpu-pod-test", product="NVIDIA-L4", gpus=1,
                                     gpu_memory_mib=23034)])
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "gpu-worker", "namespace": "default"},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4",
                             "kubernetes.io/hostname": "gpu-pod-test"},
            "containers": [{"name": "worker", "image": "kvpilot/worker:test",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    })
    deadline = time.monotonic() + 60
    pod = {}
    while time.monotonic() < deadline:
        pod = cluster.get("pod", "gpu-worker")
        if pod["status"].get("phase") == "Running" and pod["status"].get("podIP"):
            break
        time.sleep(0.5)
    assert pod["spec"]["nodeName"] == "gpu-pod-test"  # bound by the real kube-scheduler
    assert pod["status"]["phase"] == "Running"
    ip = pod["status"]["podIP"]
    assert ip.startswith("127."), ip
    node = cluster.get("node", "gpu-pod-test")
    prefix = node["spec"]["podCIDR"].rsplit(".", 1)[0] + "."
    assert ip.startswith(prefix), (ip, node["spec"]["podCIDR"])


def test_pod_cidrs_are_loopback_and_distinct():
    cidrs = [pod_cidr(i) for i in (0, 1, 255, 256, 1000)]
    assert cidrs == ["127.64.0.0/24", "127.64.1.0/24", "127.64.255.0/24", "127.65.0.0/24",
                     "127.67.232.0/24"]
