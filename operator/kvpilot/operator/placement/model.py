"""The inputs and the result of placement: snapshot, demands, policy, plan.

All are frozen dataclasses of plain values, so a plan is a pure function of them and two
runs over equal inputs give equal plans. HBM is counted in bytes throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kvpilot.api.gpus import GPUProduct, gpu_facts
from kvpilot.api.quantity import MiB, format_bytes

ANY_PRODUCT = "*"
# A Model's failure domain (``spec.placement.spread``): replicas of one model go to
# distinct GPUs ("gpu"), or distinct nodes and so distinct GPUs ("node"), while the fleet
# has room for that; "none" packs them as any replicas.
SPREADS = ("none", "gpu", "node")


@dataclass(frozen=True)
class Node:
    """One GPU node as the snapshot saw it. All GPUs of a node are of one product."""

    name: str
    product: str
    gpus: int
    gpu_hbm: int  # bytes per GPU, before any reserve
    cordoned: bool = False  # spec.unschedulable: keeps what runs there, takes nothing new
    ready: bool = True  # a node that is not Ready takes nothing, and its replicas are lost
    bandwidth_gbps: Optional[int] = None  # stated by the node; None: the catalog's
    bf16_tflops: Optional[int] = None
    # Replicas the node holds at most, those already there included: its allocatable
    # pods less what other workloads need there. None: no limit.
    max_pods: Optional[int] = None

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned

    @property
    def gpu(self) -> GPUProduct:
        """The facts of this node's GPUs (bandwidth and FLOP/s may be unknown: None)."""
        return gpu_facts(self.product, self.gpu_hbm // MiB, self.bandwidth_gbps,
                         self.bf16_tflops)


@dataclass(frozen=True)
class Existing:
    """A replica that already runs: where, and what it holds on each of its GPUs."""

    name: str
    model: str
    node: str
    gpus: tuple[int, ...]
    hbm_per_gpu: int
    # HBM bytes it streams per decode step on each GPU; None: its model's requirement
    # there says (capped by what it holds), else everything it holds.
    step_bytes: Optional[int] = None


@dataclass(frozen=True)
class Snapshot:
    """The fleet at one moment. Placement decides from this copy alone.

    The copy is older than the cluster by the time the plan is applied: a replica that
    started or a node that joined since is missing from it. That biases towards placing
    too little (a pod that does not fit when bound is retried on the next snapshot),
    never towards oversubscribing a GPU the snapshot knew to be full.
    """

    nodes: tuple[Node, ...] = ()
    replicas: tuple[Existing, ...] = ()


@dataclass(frozen=True)
class Requirement:
    """What one replica needs on a given GPU product (TP may differ per product)."""

    tp: int
    hbm_per_gpu: int
    kv_tokens: int = 0  # KV-cache tokens the budget holds (the SLA's context x sequences)
    step_bytes: int = 0  # bytes one decode step streams on each GPU at the SLA's load
    # The most bytes per step any GPU it runs on may stream, all tenants together, for
    # its interTokenLatency target (``memory.itl_step_bytes``); None: no target.
    step_budget: Optional[int] = None
    kv_bytes_per_token: int = 0  # on each GPU; turns spare HBM into KV tokens

    @property
    def total(self) -> int:
        return self.tp * self.hbm_per_gpu


@dataclass(frozen=True)
class Demand:
    """How many replicas a model wants, and what one needs on each product.

    ``requirements`` maps a GPU product to the requirement there; the key ``"*"`` covers
    every product not named. A product absent from it takes no replica: either it is not
    in ``products`` (the allowed list; empty allows any) or the replica does not fit it,
    and then ``unfit`` says why. ``spec`` (a ``kvpilot.api.model.ModelSpec``), when
    present, lets an unplaced replica's reason suggest fixes worked out by the memory
    model.

    ``spread`` (one of ``SPREADS``) is a constraint, not a score: with "gpu" a GPU that
    holds a replica of the model takes no second one, with "node" a node that holds one
    takes no second one, as long as some GPU or node without one has room. Only when
    none has is the limit raised, one replica at a time and only as far as needed: the
    replicas then share the least crowded domains (``Plan.crowded`` says so), and
    within a node they share, "node" replicas pack as any. "Room" is on the products
    where a replica takes its fewest GPUs: spreading shares a node before it raises a
    replica's tensorParallel elsewhere. See ``spread.relax``.
    """

    model: str
    replicas: int
    requirements: Mapping[str, Requirement]
    products: tuple[str, ...] = ()
    unfit: Mapping[str, str] = field(default_factory=dict)
    spec: Any = None
    spread: str = "none"

    def __post_init__(self) -> None:
        if self.spread not in SPREADS:
            raise ValueError(f"model {self.model!r}: spread must be one of "
                             f"{', '.join(SPREADS)}: {self.spread!r}")

    @property
    def spreads(self) -> bool:
        """Replicas of this model keep apart while they can ("gpu", "node")."""
        return self.spread != "none"

    @property
    def apart_nodes(self) -> bool:
        """Replicas of this model keep to distinct nodes while they can ("node"); else,
        when it spreads, to distinct GPUs ("gpu")."""
        return self.spread == "node"

    @property
    def apart_gpus(self) -> bool:
        """Replicas of this model keep to distinct GPUs while they can ("gpu")."""
        return self.spread == "gpu"

    def allows(self, product: str) -> bool:
        return not self.products or product in self.products

    def requirement(self, product: str) -> Optional[Requirement]:
        """What one replica needs on ``product``; None where it may not or cannot go."""
        return self.size_on(product) if self.allows(product) else None

    def size_on(self, product: str) -> Optional[Requirement]:
        """What one replica would need on ``product``, allowed or not (None: it does not
        fit there)."""
        req = self.requirements.get(product)
        if req is None and product not in self.unfit:
            req = self.requirements.get(ANY_PRODUCT)
        return req


@dataclass(frozen=True)
class Policy:
    """How to choose among nodes that fit.

    ``packing`` weighs the most-allocated score (fill GPUs that are already in use, so
    fewer GPUs carry load) against the spreading scores (KV headroom on the chosen GPUs,
    least-allocated node). ``reserve`` is the fraction of every GPU's HBM kept free.
    ``spread_replicas`` prefers nodes that hold fewer replicas of the same model (a
    score; the constraint a Model asks for is ``Demand.spread``).
    ``share_gpus`` lets replicas of different (or the same) models share a GPU when
    their budgets fit. ``rebalance`` re-places existing replicas as if new.
    ``worker_limits``: a fix suggested for a replica that fits nowhere must be one
    kvpilot's worker can serve (the operator's plans); off for ``kvpilot plan
    --all-models``.

    ``improve`` lets ``place()`` work on the objective of pure packing, GPUs with load:
    complete every GPU it opens, stack and stagger TP groups, repair what is left
    unplaced, consolidate, and make the plan a few other ways, keeping the best (see
    ``engine`` and ``packing``). Those steps serve that objective only, so they run when
    ``improve`` is set AND the policy packs purely (``packing == 1``, sharing on, no
    replica spreading): ``optimizes`` says whether they do.
    """

    packing: float = 1.0
    reserve: float = 0.0
    spread_replicas: bool = False
    share_gpus: bool = True
    rebalance: bool = False
    improve: bool = True
    worker_limits: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.packing <= 1.0:
            raise ValueError(f"packing must be in [0, 1]: {self.packing}")
        if not 0.0 <= self.reserve < 1.0:
            raise ValueError(f"reserve must be in [0, 1): {self.reserve}")

    @property
    def optimizes(self) -> bool:
        """Whether ``place()`` runs the GPU-count steps (see ``improve``)."""
        return (self.improve and self.packing == 1.0 and self.share_gpus
                and not self.spread_replicas)

    @classmethod
    def pack(cls, **kw: Any) -> "Policy":
        return cls(packing=1.0, **kw)

    @classmethod
    def spread(cls, **kw: Any) -> "Policy":
        kw.setdefault("spread_replicas", True)
        return cls(packing=0.0, **kw)

    def weights(self) -> dict[str, float]:
        """Score name -> weight. Packing vs spreading is this weight, not a code branch."""
        return {
            "most_allocated": self.packing,
            "kv_headroom": (1.0 - self.packing) / 2,
            "least_allocated": (1.0 - self.packing) / 2,
            "model_spread": 1.0 if self.spread_replicas else 0.0,
        }


@dataclass(frozen=True)
class Assignment:
    """One replica on one node, on ``gpus`` (indices on that node)."""

    replica: str
    model: str
    node: str
    gpus: tuple[int, ...]
    hbm_per_gpu: int
    kv_tokens: int = 0
    existing: bool = False  # it already ran there and stays
    shared: bool = False  # another replica holds HBM on at least one of these GPUs
    # Bytes it streams per decode step on each of its GPUs at its SLA's load.
    step_bytes: int = 0
    # Predicted decode step when every tenant of its GPUs decodes at full load (the
    # slowest of its GPUs); None when a GPU's bandwidth is unknown.
    step_seconds: Optional[float] = None
    # KV tokens it can hold once spare HBM on its GPUs is handed out (>= kv_tokens).
    kv_capacity: int = 0

    @property
    def tp(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class Unplaced:
    replica: str
    model: str
    reason: str


@dataclass(frozen=True)
class Crowded:
    """A model whose spread the plan keeps only in part: ``sharing`` of its ``replicas``
    share their node ("node") or a GPU ("gpu") with another replica of it. ``reason``
    says why, in one line."""

    model: str
    spread: str
    sharing: int
    replicas: int
    reason: str


@dataclass(frozen=True)
class Move:
    """In a rebalance: an existing replica that the plan puts somewhere else."""

    replica: str
    model: str
    from_node: str
    from_gpus: tuple[int, ...]
    to_node: str
    to_gpus: tuple[int, ...]


@dataclass(frozen=True)
class NodeUsage:
    """HBM on one node after the plan; ``used`` holds one entry per GPU."""

    name: str
    product: str
    gpu_capacity: int  # usable bytes per GPU (after the reserve)
    used: tuple[int, ...]
    schedulable: bool = True
    streamed: tuple[int, ...] = ()  # bytes all tenants stream per decode step, per GPU
    # Decode step per GPU with every tenant busy (bytes over bandwidth plus the fixed
    # cost); None for an idle GPU or an unknown bandwidth.
    step_seconds: tuple[Optional[float], ...] = ()

    @property
    def gpus_in_use(self) -> int:
        return sum(1 for u in self.used if u > 0)


@dataclass(frozen=True)
class Plan:
    """Where every replica goes, and why the rest do not.

    ``removals`` are existing replicas to delete (beyond the desired count, of a model no
    longer demanded, or on a node that is not Ready). ``moves_avoided`` counts existing
    replicas left exactly where they were. ``crowded``: the models whose replicas share
    a node or GPU that their spread would keep apart, and why.
    """

    assignments: tuple[Assignment, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()
    removals: tuple[str, ...] = ()
    moves: tuple[Move, ...] = ()
    moves_avoided: int = 0
    nodes: tuple[NodeUsage, ...] = ()
    crowded: tuple[Crowded, ...] = ()

    @property
    def gpus_used(self) -> int:
        """GPUs that carry any replica: what packing minimises."""
        return sum(n.gpus_in_use for n in self.nodes)

    @property
    def shared_gpus(self) -> tuple[tuple[str, int], ...]:
        """(node, GPU index) of every GPU that holds more than one replica."""
        count: dict[tuple[str, int], int] = {}
        for a in self.assignments:
            for g in a.gpus:
                count[(a.node, g)] = count.get((a.node, g), 0) + 1
        return tuple(sorted(k for k, c in count.items() if c > 1))

    @property
    def complete(self) -> bool:
        return not self.unplaced

    def placed(self, model: str) -> int:
        return sum(1 for a in self.assignments if a.model == model)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON/YAML; byte counts stay integers, with a readable twin."""
        return {
            "gpusUsed": self.gpus_used,
            "movesAvoided": self.moves_avoided,
            "assignments": [
                {
                    "replica": a.replica, "model": a.model, "node": a.node,
                    "gpus": list(a.gpus), "hbmPerGpu": a.hbm_per_gpu,
                    "hbmPerGpuHuman": format_bytes(a.hbm_per_gpu), "kvTokens": a.kv_tokens,
                    "kvCapacityTokens": a.kv_capacity, "stepBytes": a.step_bytes,
                    "stepSeconds": a.step_seconds, "existing": a.existing, "shared": a.shared,
                }
                for a in self.assignments
            ],
            "unplaced": [
                {"replica": u.replica, "model": u.model, "reason": u.reason}
                for u in self.unplaced
            ],
            "crowded": [
                {"model": c.model, "spread": c.spread, "sharing": c.sharing,
                 "replicas": c.replicas, "reason": c.reason}
                for c in self.crowded
            ],
            "removals": list(self.removals),
            "moves": [
                {"replica": m.replica, "model": m.model, "from": {"node": m.from_node,
                 "gpus": list(m.from_gpus)}, "to": {"node": m.to_node, "gpus": list(m.to_gpus)}}
                for m in self.moves
            ],
            "sharedGpus": [{"node": n, "gpu": g} for n, g in self.shared_gpus],
            "nodes": [
                {
                    "name": n.name, "product": n.product, "schedulable": n.schedulable,
                    "gpuCapacity": n.gpu_capacity, "used": list(n.used),
                    "gpusInUse": n.gpus_in_use, "streamed": list(n.streamed),
                    "stepSeconds": list(n.step_seconds),
                }
                for n in self.nodes
            ],
        }
