"""Shared by the operator's unit tests: nodes, ResourceSlices and Models as the API
server holds them."""

from __future__ import annotations

NOW = "2026-01-01T00:00:00Z"
H100 = "NVIDIA-H100-80GB-HBM3"


def node(name: str, gpus: int = 2, product: str = H100, mib: int = 81559, *,
         ready: bool = True, cordoned: bool = False, taints: list | None = None,
         since: str = "2025-01-01T00:00:00Z") -> dict:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product,
                                              "nvidia.com/gpu.memory": str(mib)}},
        "spec": {"unschedulable": cordoned, "taints": taints or []},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                   "lastTransitionTime": since}]},
    }


def gpu_slice(node_name: str, gpus: int = 2, memory: str = "80Gi",
              product: str = "NVIDIA H100 80GB HBM3", shared: bool = True) -> dict:
    return {"spec": {
        "driver": "gpu.nvidia.com", "nodeName": node_name,
        "pool": {"name": node_name, "generation": 1, "resourceSliceCount": 1},
        "devices": [{
            "name": f"gpu-{i}",
            **({"allowMultipleAllocations": True} if shared else {}),
            "attributes": {"type": {"string": "gpu"}, "productName": {"string": product},
                           "uuid": {"string": f"GPU-{node_name}-{i}"}},
            "capacity": {"memory": {"value": memory}},
        } for i in range(gpus)],
    }}


def model(name: str, replicas: int = 1, *, ns: str = "default", seqs: int = 4,
          context: int = 8192, **spec) -> dict:
    """Llama-3-8B shaped: 15 GiB of weights, 128 KiB of KV per token, 2 GiB overhead."""
    return {
        "apiVersion": "kvpilot.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "generation": 1},
        "spec": {"weights": {"bytes": "15Gi"},
                 "architecture": {"layers": 32, "attentionHeads": 32, "kvHeads": 8,
                                  "headDim": 128, "maxContextTokens": 131072},
                 "sla": {"contextTokens": context, "concurrentSequences": seqs},
                 "replicas": replicas, **spec},
    }
