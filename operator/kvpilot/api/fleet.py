"""A fleet of GPU nodes described in a small YAML file.

The same description drives the offline planner (``kvpilot plan FLEET.yaml ...``) and
the local test cluster, which creates one fake GPU node per entry::

    nodes:
      - name: h100            # with count > 1: h100-0, h100-1, ...
        product: NVIDIA-H100-80GB-HBM3
        gpus: 8
        count: 2
      - name: l4
        product: NVIDIA-L4
        gpus: 1
      - name: custom
        product: ACME-X1
        memoryMiB: 65536      # required when the product is not in the catalog
        bandwidthGBps: 2000   # HBM bandwidth; without it (and not in the catalog) the
        bf16TFLOPS: 400       # planner cannot check latency targets on this node
        gpus: 4
        maxPods: 110          # allocatable pods (on the local cluster: 110 when not given)
        unschedulable: true   # cordoned

Node objects get the labels NVIDIA GPU Feature Discovery sets on real nodes, and the
bandwidth and FLOP/s a group states as ``kvpilot.dev/gpu.bandwidth-gbps`` and
``kvpilot.dev/gpu.bf16-tflops``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kvpilot.api.files import one_line, read_documents
from kvpilot.api.gpus import (
    CATALOG, LABEL_BANDWIDTH_GBPS, LABEL_BF16_TFLOPS, LABEL_COUNT, LABEL_MEMORY_MIB,
    LABEL_PRODUCT, GPUProduct, gpu_facts,
)
from kvpilot.api.quantity import MiB


class _Base(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class NodeGroup(_Base):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    product: str = Field(min_length=1, max_length=128)
    gpus: int = Field(ge=0, le=64)
    memory_mib: Optional[int] = Field(None, alias="memoryMiB", ge=1)
    bandwidth_gbps: Optional[int] = Field(None, alias="bandwidthGBps", ge=1, le=1_000_000)
    bf16_tflops: Optional[int] = Field(None, alias="bf16TFLOPS", ge=1, le=1_000_000)
    count: int = Field(1, ge=1, le=100_000)
    max_pods: Optional[int] = Field(None, ge=1, le=100_000)
    unschedulable: bool = False
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _memory_known(self) -> "NodeGroup":
        if self.memory_mib is None and self.product not in CATALOG:
            known = ", ".join(sorted(CATALOG))
            raise ValueError(
                f"product {self.product!r} is not in the catalog ({known}); give memoryMiB"
            )
        return self

    @property
    def gpu_memory_mib(self) -> int:
        return self.memory_mib if self.memory_mib is not None else CATALOG[self.product].memory_mib

    def node_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]


class FleetNode(_Base):
    """One concrete node of a fleet."""

    name: str
    product: str
    gpus: int
    gpu_memory_mib: int
    bandwidth_gbps: Optional[int] = None  # stated by the fleet file; None: the catalog's
    bf16_tflops: Optional[int] = None
    max_pods: Optional[int] = None  # allocatable pods; None: not stated
    unschedulable: bool = False
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def gpu_hbm_bytes(self) -> int:
        return self.gpu_memory_mib * MiB

    @property
    def gpu(self) -> GPUProduct:
        """The facts of this node's GPUs: what the fleet file states, else the catalog's."""
        return gpu_facts(self.product, self.gpu_memory_mib, self.bandwidth_gbps,
                         self.bf16_tflops)

    def gfd_labels(self) -> dict[str, str]:
        """Labels as NVIDIA GPU Feature Discovery puts them on a real node, with the
        bandwidth and FLOP/s overrides the fleet file states."""
        stated = {LABEL_BANDWIDTH_GBPS: self.bandwidth_gbps, LABEL_BF16_TFLOPS: self.bf16_tflops}
        return {
            **self.labels,
            LABEL_PRODUCT: self.product,
            LABEL_MEMORY_MIB: str(self.gpu_memory_mib),
            LABEL_COUNT: str(self.gpus),
            **{k: str(v) for k, v in stated.items() if v is not None},
        }


class Fleet(_Base):
    nodes: list[NodeGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "Fleet":
        seen: set[str] = set()
        for group in self.nodes:
            for name in group.node_names():
                if name in seen:
                    raise ValueError(f"node name {name!r} appears twice")
                seen.add(name)
        return self

    def expand(self) -> list[FleetNode]:
        return [
            FleetNode(
                name=name, product=g.product, gpus=g.gpus, gpu_memory_mib=g.gpu_memory_mib,
                bandwidth_gbps=g.bandwidth_gbps, bf16_tflops=g.bf16_tflops,
                max_pods=g.max_pods, unschedulable=g.unschedulable, labels=g.labels,
            )
            for g in self.nodes
            for name in g.node_names()
        ]


def load_fleet(path: str | Path) -> Fleet:
    """Load a fleet file; errors name the file and the field, on one line."""
    docs = read_documents(path)
    if len(docs) > 1:
        raise ValueError(f"{path}: a fleet is one YAML document, found {len(docs)}")
    try:
        return Fleet.model_validate(docs[0] if docs else {})
    except ValidationError as err:
        raise ValueError(f"{path}: {one_line(err)}") from err
