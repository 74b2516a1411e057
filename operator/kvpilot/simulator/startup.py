"""How long a new replica takes from pod created to serving, in the simulator.

A worker pod starts in three parts (docs/worker.md, ``objects.weights_for``):

1. **Download**, by the init container, of an ``hf://`` checkpoint into the node-local
   weights cache (one download per node and revision: a second replica of the same
   weights on that node waits for the first one's download, a later one finds it
   there). A node that already holds the weights skips it.
2. **Process start and load**: the container starts, imports torch, makes its CUDA
   context, and every rank reads its shard of the weights from the node's disk into
   HBM (the ranks of a TP group read in parallel).
3. **Graph capture**: CUDA graphs for the decode batch sizes, then ``/ready``.

The figures are **estimates until measured on a GPU** (no device was available when
they were set): a 4 Gbit/s share of a hub or mirror per node (500 MB/s), 2 GB/s per
rank from a local NVMe cache into HBM, 15 s for the container, torch and CUDA, 10 s of
graph capture. An 8B bf16 Model (16 GB) then starts in 32 + 15 + 8 + 10 = 65 s on a
node without its weights and 33 s on one that holds them.

The cache keeps what it downloaded for the whole run (no eviction): nodes are assumed
to have disk for every Model they ever served.
"""

from __future__ import annotations

from dataclasses import dataclass
from kvpilot.api.memory import weight_bytes
from kvpilot.api.model import ModelSpec


@dataclass(frozen=True)
class StartupModel:
    """Seconds of each part of a start (estimates; see the module docstring)."""

    download_bytes_per_second: float = 500e6  # per node, hub or mirror -> node cache
    load_bytes_per_second: float = 2e9  # per rank, node cache -> HBM
    process_seconds: float = 15.0  # container, torch import, CUDA context
    graph_capture_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.download_bytes_per_second <= 0 or self.load_bytes_per_second <= 0:
            raise ValueError("download and load bandwidths must be > 0")
        if self.process_seconds < 0 or self.graph_capture_seconds < 0:
            raise ValueError("process and graph-capture seconds must be >= 0")

    def download_seconds(self, spec: ModelSpec) -> float:
        return weight_bytes(spec) / self.download_bytes_per_second

    def serve_seconds(self, spec: ModelSpec, tp: int) -> float:
        """Weights on the node -> serving: process, load of one rank's shard, graphs."""
        return (self.process_seconds + weight_bytes(spec) / tp / self.load_bytes_per_second
                + self.graph_capture_seconds)


def weights_key(name: str, spec: ModelSpec) -> str:
    """What the node cache holds the Model's weights under: its source (two Models of
    one checkpoint share a download), or, without one, the Model's own name."""
    return spec.source or f"model:{name}"


class WeightsCache:
    """Per node, when each set of weights is (or will be) in its cache."""

    def __init__(self) -> None:
        self.ready: dict[tuple[str, str], float] = {}

    def hold(self, node: str, key: str, at: float = 0.0) -> None:
        """The node holds the weights from ``at`` on (a warm fleet's nodes)."""
        self.ready.setdefault((node, key), at)

    def holds(self, node: str, key: str, now: float) -> bool:
        t = self.ready.get((node, key))
        return t is not None and t <= now

    def start(self, node: str, key: str, spec: ModelSpec, tp: int, now: float,
              model: StartupModel) -> "Start":
        """A replica created at ``now``: when its weights are on the node and when it
        serves. The first replica without cached weights starts the node's download."""
        there = self.ready.get((node, key))
        if there is None:
            there = now + model.download_seconds(spec)
            self.ready[(node, key)] = there
        downloaded = max(now, there)
        return Start(downloaded - now, downloaded + model.serve_seconds(spec, tp) - now)


@dataclass(frozen=True)
class Start:
    waited_for_weights: float  # seconds of download this start waited for (0: cached)
    seconds: float  # created -> serving

    @property
    def cached(self) -> bool:
        return self.waited_for_weights == 0

