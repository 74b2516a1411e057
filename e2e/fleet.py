"""Fake GPU nodes for the local cluster, created through the API from a fleet file.

Each node carries what a real GPU node shows the scheduler: the labels NVIDIA GPU Feature
Discovery sets (``nvidia.com/gpu.product``, ``nvidia.com/gpu.memory`` in MiB,
``nvidia.com/gpu.count``), ``nvidia.com/gpu`` capacity, and a pod CIDR inside
127.0.0.0/8 so KWOK hands its pods loopback IPs. The annotation
``kwok.x-k8s.io/node=fake`` puts the node under KWOK's management.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kvpilot.api.fleet import FleetNode, load_fleet
from kvpilot.api.gpus import RESOURCE_GPU

from e2e.cluster import KWOK_NODE_ANNOTATION, Cluster

# Node i gets 127.(64 + i // 256).(i % 256).0/24: up to 16,384 nodes of 254 pods each,
# clear of 127.0.0.0/16 where the control plane listens.
POD_CIDR_BASE = 64


def pod_cidr(index: int) -> str:
    if not 0 <= index < 256 * (256 - POD_CIDR_BASE):
        raise ValueError(f"node index {index} out of the loopback pod-CIDR range")
    return f"127.{POD_CIDR_BASE + index // 256}.{index % 256}.0/24"


def node_object(node: FleetNode, index: int) -> dict[str, Any]:
    capacity = {"cpu": "128", "memory": "1Ti", "pods": "110", "ephemeral-storage": "1Ti"}
    if node.gpus:
        capacity[RESOURCE_GPU] = str(node.gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true" if node.gpus else "false",
                **node.gfd_labels(),
            },
        },
        "spec": {"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)],
                 "unschedulable": node.unschedulable},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def create_fleet(cluster: Cluster, fleet_file: Path | str, timeout: float = 60) -> list[str]:
    """Create one fake node per fleet entry and wait until all are Ready with GPUs."""
    nodes = load_fleet(fleet_file).expand()
    return create_nodes(cluster, nodes, timeout)


def create_nodes(cluster: Cluster, nodes: list[FleetNode], timeout: float = 60) -> list[str]:
    if not nodes:
        return []
    existing = _node_names(cluster)
    objects = [node_object(n, len(existing) + i) for i, n in enumerate(nodes)]
    cluster.kubectl("create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": objects}))
    # A Node's status is not taken from a create request; set capacity on the status
    # subresource, as a kubelet would report it.
    with cluster.http() as client:
        for obj in objects:
            resp = client.patch(
                f"/api/v1/nodes/{obj['metadata']['name']}/status",
                content=json.dumps({"status": obj["status"]}),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            resp.raise_for_status()
    names = [o["metadata"]["name"] for o in objects]
    wait_nodes_ready(cluster, names, timeout)
    return names


def _node_names(cluster: Cluster) -> set[str]:
    return {item["metadata"]["name"] for item in cluster.get("nodes")["items"]}


def wait_nodes_ready(cluster: Cluster, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        items = cluster.get("nodes")["items"]
        for item in items:
            conditions = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
            if conditions.get("Ready") == "True":
                pending.discard(item["metadata"]["name"])
        if pending:
            time.sleep(0.5)
    if pending:
        raise TimeoutError(f"nodes not Ready after {timeout}s: {sorted(pending)}")
