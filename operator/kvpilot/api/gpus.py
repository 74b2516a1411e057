"""GPU products as NVIDIA GPU Feature Discovery labels them, with their HBM, its
bandwidth and their dense bf16 FLOP/s.

``nvidia.com/gpu.memory`` is reported in MiB, as the driver reports the card's memory.
The catalog lets fleets and benchmarks name a product without repeating its facts.

Memory decides whether a replica fits a GPU; bandwidth decides how fast it decodes there
(a decode step streams the weights and the KV cache from HBM), and FLOP/s how fast it
prefills. Bandwidth and FLOP/s are the datasheet figures (SXM parts, dense, no
sparsity); ``kvpilot.api.memory`` applies the efficiency a real engine reaches.

GFD does not label bandwidth or FLOP/s. For a product the catalog does not know, a node
states them in two labels of the same form (``LABEL_BANDWIDTH_GBPS``,
``LABEL_BF16_TFLOPS``), and a fleet file in ``bandwidthGBps`` and ``bf16TFLOPS``; what a
node states overrides the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional

from kvpilot.api.quantity import MiB

LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_MEMORY_MIB = "nvidia.com/gpu.memory"
LABEL_COUNT = "nvidia.com/gpu.count"
RESOURCE_GPU = "nvidia.com/gpu"
LABEL_BANDWIDTH_GBPS = "kvpilot.dev/gpu.bandwidth-gbps"  # HBM bandwidth, 10^9 bytes/s
LABEL_BF16_TFLOPS = "kvpilot.dev/gpu.bf16-tflops"  # dense bf16, 10^12 FLOP/s

GB = 10**9
TFLOP = 10**12


@dataclass(frozen=True)
class GPUProduct:
    name: str  # the nvidia.com/gpu.product label value
    memory_mib: int  # the nvidia.com/gpu.memory label value
    bandwidth_gbps: Optional[int] = None  # HBM bandwidth in GB/s; None: unknown
    bf16_tflops: Optional[int] = None  # dense bf16 TFLOP/s; None: unknown

    @property
    def hbm_bytes(self) -> int:
        return self.memory_mib * MiB

    @property
    def hbm_bandwidth(self) -> Optional[int]:
        """Datasheet HBM bandwidth in bytes/s, None when unknown."""
        return None if self.bandwidth_gbps is None else self.bandwidth_gbps * GB

    @property
    def bf16_flops(self) -> Optional[int]:
        """Datasheet dense bf16 FLOP/s, None when unknown."""
        return None if self.bf16_tflops is None else self.bf16_tflops * TFLOP


CATALOG: dict[str, GPUProduct] = {
    p.name: p
    for p in (
        GPUProduct("NVIDIA-H200", 143771, bandwidth_gbps=4800, bf16_tflops=989),
        GPUProduct("NVIDIA-H100-80GB-HBM3", 81559, bandwidth_gbps=3350, bf16_tflops=989),
        GPUProduct("NVIDIA-A100-SXM4-80GB", 81920, bandwidth_gbps=2039, bf16_tflops=312),
        GPUProduct("NVIDIA-A100-SXM4-40GB", 40960, bandwidth_gbps=1555, bf16_tflops=312),
        GPUProduct("NVIDIA-L40S", 46068, bandwidth_gbps=864, bf16_tflops=362),
        GPUProduct("NVIDIA-L4", 23034, bandwidth_gbps=300, bf16_tflops=121),
    )
}


def gpu_facts(
    product: str, memory_mib: int, bandwidth_gbps: Optional[int] = None,
    bf16_tflops: Optional[int] = None,
) -> GPUProduct:
    """The facts of one node's GPUs: its own memory, and bandwidth and FLOP/s as the
    node states them, else as the catalog knows the product, else unknown (None)."""
    known = CATALOG.get(product, GPUProduct(product, memory_mib))
    return replace(
        known, memory_mib=memory_mib,
        bandwidth_gbps=bandwidth_gbps if bandwidth_gbps is not None else known.bandwidth_gbps,
        bf16_tflops=bf16_tflops if bf16_tflops is not None else known.bf16_tflops,
    )


def _positive_int(value: Optional[str]) -> Optional[int]:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def label_overrides(labels: Mapping[str, str]) -> tuple[Optional[int], Optional[int]]:
    """(bandwidth GB/s, bf16 TFLOP/s) a node states in its labels; a missing or malformed
    label (not a positive integer) states nothing, and the catalog's figure stands."""
    return (_positive_int(labels.get(LABEL_BANDWIDTH_GBPS)),
            _positive_int(labels.get(LABEL_BF16_TFLOPS)))
