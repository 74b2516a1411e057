"""GPU products as NVIDIA GPU Feature Discovery labels them, with their HBM.

``nvidia.com/gpu.memory`` is reported in MiB, as the driver reports the card's memory.
The catalog lets fleets and benchmarks name a product without repeating its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.api.quantity import MiB

LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_MEMORY_MIB = "nvidia.com/gpu.memory"
LABEL_COUNT = "nvidia.com/gpu.count"
RESOURCE_GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class GPUProduct:
    name: str  # the nvidia.com/gpu.product label value
    memory_mib: int  # the nvidia.com/gpu.memory label value

    @property
    def hbm_bytes(self) -> int:
        return self.memory_mib * MiB


CATALOG: dict[str, GPUProduct] = {
    p.name: p
    for p in (
        GPUProduct("NVIDIA-H200", 143771),
        GPUProduct("NVIDIA-H100-80GB-HBM3", 81559),
        GPUProduct("NVIDIA-A100-SXM4-80GB", 81920),
        GPUProduct("NVIDIA-A100-SXM4-40GB", 40960),
        GPUProduct("NVIDIA-L40S", 46068),
        GPUProduct("NVIDIA-L4", 23034),
    )
}
