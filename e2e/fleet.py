"""Fake GPU nodes for the local cluster, created through the API from a fleet file.

Each node carries what a real GPU node shows the scheduler: the labels NVIDIA GPU Feature
Discovery sets (``nvidia.com/gpu.product``, ``nvidia.com/gpu.memory`` in MiB,
``nvidia.com/gpu.count``), ``nvidia.com/gpu`` capacity, and a pod CIDR inside
127.0.0.0/8 so KWOK hands its pods loopback IPs. The annotation
``kwok.x-k8s.io/node=fake`` puts the node under KWOK's management.

With ``dra=True`` each node's GPUs are also published as a ResourceSlice, as NVIDIA's DRA
GPU driver publishes them (driver ``gpu.nvidia.com``, one pool per node, devices
``gpu-<minor>`` with ``type``, ``uuid``, ``productName`` and the other attributes it sets,
and ``memory`` capacity in bytes), plus the driver's DeviceClass. Each device allows
multiple allocations with its memory as consumable capacity (KEP-5075), the sharing mode
kvpilot's DRA realization needs: the real kube-scheduler then allocates the claims on the
KWOK nodes and keeps every GPU's memory sum within its capacity.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvpilot.api.fleet import FleetNode, load_fleet
from kvpilot.api.gpus import RESOURCE_GPU

from e2e.cluster import KWOK_NODE_ANNOTATION, Cluster, install_crds, route_pod_cidr

# Node i gets 127.(64 + i // 256).(i % 256).0/24: up to 16,384 nodes of 254 pods each,
# clear of 127.0.0.0/16 where the control plane listens.
POD_CIDR_BASE = 64


def pod_cidr(index: int, routed: bool = False) -> str:
    """Node ``index``'s pod CIDR: loopback, or in ``ROUTED_POD_CIDR`` (198.18.0.0/15,
    512 nodes) where ``routed``."""
    if routed:
        if not 0 <= index < 512:
            raise ValueError(f"node index {index} out of the routed pod-CIDR range")
        return f"198.{18 + index // 256}.{index % 256}.0/24"
    if not 0 <= index < 256 * (256 - POD_CIDR_BASE):
        raise ValueError(f"node index {index} out of the loopback pod-CIDR range")
    return f"127.{POD_CIDR_BASE + index // 256}.{index % 256}.0/24"


def node_object(node: FleetNode, index: int, routed: bool = False) -> dict[str, Any]:
    capacity = {"cpu": "128", "memory": "1Ti", "pods": str(node.max_pods or 110),
                "ephemeral-storage": "1Ti"}
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
        "spec": {"podCIDR": pod_cidr(index, routed), "podCIDRs": [pod_cidr(index, routed)],
                 "unschedulable": node.unschedulable},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


DRA_DRIVER = "gpu.nvidia.com"
ARCHITECTURES = {"H100": ("Hopper", "9.0.0"), "H200": ("Hopper", "9.0.0"),
                 "A100": ("Ampere", "8.0.0"), "L40S": ("Ada Lovelace", "8.9.0"),
                 "L4": ("Ada Lovelace", "8.9.0")}


def device_class() -> dict[str, Any]:
    """The DeviceClass NVIDIA's driver installs for whole GPUs."""
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": DRA_DRIVER},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRA_DRIVER}' && "
                                                      f"device.attributes['{DRA_DRIVER}']"
                                                      ".type == 'gpu'"}}]},
    }


def gpu_slice(node: FleetNode) -> dict[str, Any]:
    """The node's GPUs as the driver's ResourceSlice, sharing by memory switched on."""
    product_name = node.product.replace("-", " ")  # GFD put dashes where NVML has spaces
    arch, cc = next((v for k, v in ARCHITECTURES.items() if f"-{k}" in node.product),
                    ("Hopper", "9.0.0"))
    devices = []
    for i in range(node.gpus):
        gpu_uuid = "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.name}/{i}"))
        devices.append({
            "name": f"gpu-{i}",
            "allowMultipleAllocations": True,
            "attributes": {
                "type": {"string": "gpu"}, "uuid": {"string": gpu_uuid},
                "productName": {"string": product_name}, "brand": {"string": "Nvidia"},
                "architecture": {"string": arch}, "cudaComputeCapability": {"version": cc},
                "driverVersion": {"version": "580.95.5"},
                "cudaDriverVersion": {"version": "13.0.0"},
                "resource.kubernetes.io/pciBusID": {"string": f"0000:{0x18 + i:02x}:00.0"},
            },
            "capacity": {"memory": {"value": f"{node.gpu_memory_mib}Mi"}},
        })
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": f"{node.name}-{DRA_DRIVER}"},
        "spec": {"driver": DRA_DRIVER, "nodeName": node.name,
                 "pool": {"name": node.name, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices},
    }


def create_fleet(cluster: Cluster, fleet_file: Path | str, timeout: float = 60,
                 dra: bool = False) -> list[str]:
    """Create one fake node per fleet entry and wait until all are Ready with GPUs."""
    nodes = load_fleet(fleet_file).expand()
    return create_nodes(cluster, nodes, timeout, dra=dra)


def create_nodes(cluster: Cluster, nodes: list[FleetNode], timeout: float = 60,
                 dra: bool = False) -> list[str]:
    if not nodes:
        return []
    existing = _node_names(cluster)
    objects = [node_object(n, len(existing) + i, cluster.real_workers)
               for i, n in enumerate(nodes)]
    extra = [device_class()] + [gpu_slice(n) for n in nodes if n.gpus] if dra else []
    items = objects + extra
    for i in range(0, len(items), 200):  # a thousand nodes in one request time out
        cluster.kubectl("apply", "--server-side", "--field-manager=kvpilot-e2e", "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List",
                                          "items": items[i:i + 200]}), timeout=300)
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


@contextmanager
def fleet_cluster(state: Path, nodes: list[FleetNode], *, dra: bool = False,
                  crds: Path | None = None, real_workers: bool = False):
    """A control plane of its own (dies with this process) with these fake GPU nodes,
    and the CRDs of ``crds`` installed; stopped on exit. ``real_workers``: see
    ``Cluster.real_workers``; RuntimeError where this host cannot route pod IPs."""
    if real_workers and (why := route_pod_cidr()):
        raise RuntimeError(f"pods with routable IPs need a local route: {why}")
    cluster = Cluster(state, tie_to_parent=True, real_workers=real_workers)
    cluster.up()
    try:
        if crds is not None:
            install_crds(cluster, crds)
        create_nodes(cluster, nodes, dra=dra)
        yield cluster
    finally:
        cluster.down()


# ---- the Models and the fleet most e2e tests run -----------------------------------------
H100 = "NVIDIA-H100-80GB-HBM3"
FLEET = [FleetNode(name=f"h100-{i}", product=H100, gpus=2, gpu_memory_mib=81559)
         for i in range(3)] + [FleetNode(name="l40s-0", product="NVIDIA-L40S", gpus=1,
                                         gpu_memory_mib=46068)]
SELECTOR = "app.kubernetes.io/managed-by=kvpilot"


def model(name: str, replicas: int, *, weights: str = "15Gi", layers: int = 32,
          kv_heads: int = 8, head_dim: int = 128, context: int = 8192, seqs: int = 4) -> dict:
    return {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"weights": {"bytes": weights},
                 "architecture": {"layers": layers, "attentionHeads": 32, "kvHeads": kv_heads,
                                  "headDim": head_dim, "maxContextTokens": 131072},
                 "sla": {"contextTokens": context, "concurrentSequences": seqs},
                 "replicas": replicas, "maxReplicas": 16},
    }


LLAMA = model("llama", 2)  # 15 GiB + 4 GiB KV + 2 GiB = 21 GiB per replica
QWEN = model("qwen", 3, weights="1Gi", layers=24, kv_heads=2, head_dim=64, context=4096,
             seqs=8)  # 1 GiB + 384 MiB + 2 GiB
MISTRAL = model("mistral", 1)
HUGE = model("huge", 1, context=131072, seqs=64)  # 1 TiB of KV: fits nowhere
# A small Model: 1 GiB of weights, 384 MiB of KV, 2 GiB of overhead.
SMALL = dict(weights="1Gi", layers=24, kv_heads=2, head_dim=64, context=4096, seqs=8)


def autoscaled(name: str, replicas: int = 1, up: int = 2, down: int = 2) -> dict:
    """A small Model autoscaled on KV pressure (target 75%), 1 to 3 replicas."""
    m = model(name, replicas, **SMALL)
    m["spec"].update(minReplicas=1, maxReplicas=3, autoscaling={
        "enabled": True, "targetKvPressurePercent": 75, "scaleUpStabilizationSeconds": up,
        "scaleDownStabilizationSeconds": down, "cooldownSeconds": 0})
    return m
