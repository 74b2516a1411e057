"""What the cluster looks like, as placement sees it: a pure function of raw objects.

``cluster_view(nodes, slices, pods, claims, mode)`` turns the operator's in-memory
indexes (plain dicts, as the API server returns them) into a placement ``Snapshot`` plus
what realizing a plan needs: which DRA device is GPU ``i`` of a node, and which pods and
claims make up each existing replica.

Which nodes take replicas:
- a node that is tainted NoExecute (untolerated), being deleted, or NotReady for longer
  than a grace period loses its replicas: they are re-placed elsewhere (``Node.ready``
  is False); within the grace it keeps them and takes nothing new;
- a cordoned node keeps what runs and takes nothing new, and its replicas move off it
  make-before-break (``ClusterView.evacuate``, see ``reconcile``);
- a node tainted NoSchedule (untolerated) keeps what runs and takes nothing new;
- GPUs come from NVIDIA GPU Feature Discovery labels and allocatable ``nvidia.com/gpu``
  (device-plugin mode) or from the DRA driver's ResourceSlices (DRA mode, where the GPU
  count, product and memory are the devices the driver publishes).

Existing replicas are keyed ``namespace/name`` and belong to the model key
``namespace/model``, so Models of the same name in two namespaces never mix. In DRA mode
memory that other workloads' claims hold on kvpilot's GPUs is an existing replica of a
pseudo-model (``FOREIGN``), so placement never counts it as free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from kvpilot.api import contract
from kvpilot.api.gpus import LABEL_MEMORY_MIB, LABEL_PRODUCT, RESOURCE_GPU, label_overrides
from kvpilot.api.quantity import MiB, parse_bytes
from kvpilot.operator.objects import (
    ANN_DRAIN, ANN_GPUS, ANN_HBM, ANN_NODE, ANN_SPEC_HASH, FETCH_CONTAINER, LABEL_MODEL,
    MANAGED_BY, MANAGER, POOL_CRD, POOL_VERSION, Device,
)
from kvpilot.operator.placement import Existing, Node, Snapshot

FOREIGN = "(other workloads)"
# A draining replica still holds its HBM but no longer counts towards its Model: it is
# an existing replica of this pseudo-model, which placement keeps and never demands.
DRAINING = "(draining)"
TOLERATED_TAINTS = {RESOURCE_GPU}  # worker pods tolerate the usual GPU-node taint

Obj = Mapping[str, Any]


def model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


# "<Reason>: <message>" as workers and fetches write it (kvpilot.api.contract); a
# message the kubelet took from the logs instead may hold it after other lines.
_TERMINATION = re.compile(
    rf"({contract.REASON_WEIGHTS_UNAVAILABLE}|{contract.REASON_WEIGHTS_MISMATCH}|"
    rf"{contract.REASON_LOAD_FAILED}|{contract.REASON_RANK_FAILED}): ([^\n]*)")
# Container states that will not start without a change from outside.
_STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerError",
          "CreateContainerConfigError"}
WORKER_FAILED = "WorkerFailed"
WORKER_CRASH_LOOP = "WorkerCrashLoop"


@dataclass(frozen=True)
class Failure:
    """Why a replica's pod does not serve and will not by itself: the reason a worker or
    fetch wrote (``kvpilot.api.contract``), else what the kubelet or scheduler says."""

    reason: str
    message: str


def _container_failure(status: Obj) -> Failure | None:
    name = status.get("name", "")
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    ended = state.get("terminated") or {}
    if not (ended and ended.get("exitCode")):
        ended = (status.get("lastState") or {}).get("terminated") or {}
        if "running" in state or not ended.get("exitCode"):
            ended = {}  # it runs again, or never failed
    fallback = (contract.REASON_WEIGHTS_UNAVAILABLE if name == FETCH_CONTAINER else
                WORKER_CRASH_LOOP if status.get("restartCount") else WORKER_FAILED)
    if ended:
        text = ended.get("message") or ""
        found = _TERMINATION.findall(text)
        if found:
            return Failure(*found[-1])
        lines = [ln for ln in text.splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else f"exit code {ended.get('exitCode')}"
        return Failure(fallback, f"container {name} exited with code "
                                 f"{ended.get('exitCode')} ({ended.get('reason', 'Error')}): "
                                 f"{detail}")
    if waiting.get("reason") in _STUCK:
        return Failure(fallback, f"container {name}: {waiting['reason']}: "
                                 f"{waiting.get('message', '')}".rstrip(": "))
    return None


def pod_failure(pod: Obj | None) -> Failure | None:
    """The first reason a pod cannot serve: a failed fetch or worker, a container that
    cannot be created, or a volume the scheduler cannot find."""
    if pod is None:
        return None
    status = pod.get("status") or {}
    for c in status.get("conditions") or []:
        if (c.get("type") == "PodScheduled" and c.get("status") == "False"
                and "persistentvolumeclaim" in (c.get("message") or "")):
            return Failure(contract.REASON_WEIGHTS_UNAVAILABLE, c["message"])
    for key in ("initContainerStatuses", "containerStatuses"):
        for c in status.get(key) or []:
            if (found := _container_failure(c)) is not None:
                return found
    return None


def fetching(pod: Obj | None) -> bool:
    """The pod's weights are being fetched (its fetch init container runs)."""
    statuses = ((pod or {}).get("status") or {}).get("initContainerStatuses") or []
    return any(c.get("name") == FETCH_CONTAINER and "running" in (c.get("state") or {})
               for c in statuses)


@dataclass
class ReplicaObjects:
    """The pod and (DRA) claim of one existing replica; either may be missing."""

    key: str  # namespace/name
    model: str  # namespace/model
    pod: Obj | None = None
    claim: Obj | None = None

    @property
    def terminating(self) -> bool:
        return any(o is not None and o["metadata"].get("deletionTimestamp")
                   for o in (self.pod, self.claim))

    @property
    def drain_started(self) -> str | None:
        if self.pod is None:
            return None
        return (self.pod["metadata"].get("annotations") or {}).get(ANN_DRAIN)

    @property
    def spec_hash(self) -> str | None:
        """The spec hash of the pod, else (a replica whose pod is gone) of the claim."""
        return ((self.pod or self.claim or {}).get("metadata", {}).get("annotations")
                or {}).get(ANN_SPEC_HASH)

    @property
    def ip(self) -> str | None:
        return ((self.pod or {}).get("status") or {}).get("podIP")

    @property
    def ready(self) -> bool:
        if self.pod is None or self.pod["metadata"].get("deletionTimestamp"):
            return False
        conditions = (self.pod.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    @property
    def failure(self) -> Failure | None:
        return pod_failure(self.pod)

    @property
    def fetching(self) -> bool:
        return fetching(self.pod)


@dataclass
class ClusterView:
    snapshot: Snapshot
    devices: dict[tuple[str, int], Device] = field(default_factory=dict)
    replicas: dict[str, ReplicaObjects] = field(default_factory=dict)
    # node -> why its replicas are lost or, when removed, deleted without a drain
    node_problems: dict[str, str] = field(default_factory=dict)
    services: frozenset[str] = frozenset()  # model keys whose Service exists
    evacuate: frozenset[str] = frozenset()  # cordoned nodes: replicas move off, one by one
    # model key -> its InferencePool as stored; None: the cluster serves no InferencePool
    # (or the settings turned them off), so the operator makes none.
    pools: dict[str, Obj] | None = None


def _taints(node: Obj) -> list[Obj]:
    return [t for t in (node.get("spec") or {}).get("taints") or []
            if t.get("key") not in TOLERATED_TAINTS]


# Taints the node lifecycle controller derives from readiness and cordoning: handled
# through the Ready condition (with its grace) and spec.unschedulable instead.
DERIVED_TAINTS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable",
                  "node.kubernetes.io/unschedulable"}


def epoch(ts: str) -> float:
    """Seconds since the epoch of an API server timestamp (``2026-01-01T00:00:00Z``)."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()


def _since(ts: str | None) -> float | None:
    try:
        return epoch(ts or "")
    except ValueError:
        return None


@dataclass(frozen=True)
class NodeState:
    """What a node's conditions, cordon and taints mean for its replicas."""

    ready: bool  # keeps its replicas; False: they are lost and placed elsewhere at once
    keeps_only: bool  # takes no new replica
    why: str = ""  # what is wrong with it, for reasons and events ("" when nothing)
    # Its replicas move off it, make-before-break: a replacement is placed elsewhere and
    # Ready before the old one drains (a cordon: the node is being taken out of service).
    evacuate: bool = False
    # Its workers may not answer (NotReady, within the grace): a replica removed there is
    # deleted, not drained.
    unreachable: bool = False


def node_state(node: Obj, now_s: float | None = None, grace: float = 0.0) -> NodeState:
    """How a node keeps and takes replicas.

    A node NotReady for less than ``grace`` seconds (by its Ready condition's transition
    time, at ``now_s``) keeps its replicas and takes nothing new: heartbeats that are
    late for a moment must not move every replica of a busy node. Past the grace its
    replicas are placed elsewhere, as Kubernetes evicts pods from it after a while; so
    are those of a node being deleted or tainted NoExecute. A cordoned node keeps what
    runs until a replacement of each replica is Ready elsewhere (a cordon announces
    maintenance, and is not an outage); a NoSchedule taint keeps what runs, as
    Kubernetes does.
    """
    conditions = (node.get("status") or {}).get("conditions") or []
    cond = next((c for c in conditions if c.get("type") == "Ready"), {})
    if node["metadata"].get("deletionTimestamp"):
        return NodeState(False, False, "node is being deleted")
    if cond.get("status") != "True":
        since = _since(cond.get("lastTransitionTime"))
        if now_s is not None and since is not None and now_s - since < grace:
            return NodeState(True, True, f"node is NotReady for {now_s - since:.0f}s",
                             unreachable=True)
        return NodeState(False, False, "node is NotReady")
    taints = [t for t in _taints(node) if t.get("key") not in DERIVED_TAINTS]
    if any(t.get("effect") == "NoExecute" for t in taints):
        return NodeState(False, False, "node has a NoExecute taint")
    if (node.get("spec") or {}).get("unschedulable"):
        return NodeState(True, True, "node is cordoned", evacuate=True)
    if any(t.get("effect") == "NoSchedule" for t in taints):
        return NodeState(True, True, "node has a NoSchedule taint")
    return NodeState(True, False)


def max_pods(node: Obj, reserved: int) -> int | None:
    """The replicas a node may hold: its allocatable pods less ``reserved`` for other
    workloads' pods (which the operator does not watch); None when it does not say."""
    raw = ((node.get("status") or {}).get("allocatable") or {}).get("pods")
    try:
        return max(0, int(raw) - reserved) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _gpu_node(node: Obj, state: NodeState, reserved: int) -> Node | None:
    """A device-plugin GPU node from GFD labels and allocatable nvidia.com/gpu (``state``:
    its ``node_state``)."""
    labels = node["metadata"].get("labels") or {}
    product = labels.get(LABEL_PRODUCT)
    gpus = (node.get("status") or {}).get("allocatable", {}).get(RESOURCE_GPU)
    try:
        mib = int(labels.get(LABEL_MEMORY_MIB, ""))
        count = int(gpus) if gpus is not None else 0
    except ValueError:
        return None
    if not product or count <= 0 or mib <= 0:
        return None
    bandwidth, tflops = label_overrides(labels)
    return Node(node["metadata"]["name"], product, count, mib * MiB, cordoned=state.keeps_only,
                ready=state.ready, bandwidth_gbps=bandwidth, bf16_tflops=tflops,
                max_pods=max_pods(node, reserved))


def dra_product(product_name: str) -> str:
    """The GFD label form of a driver's product name: NVIDIA H100 80GB HBM3 ->
    NVIDIA-H100-80GB-HBM3 (GFD replaces spaces with dashes)."""
    return re.sub(r"\s+", "-", product_name.strip())


def _device_number(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def slice_devices(slices: Iterable[Obj], driver: str) -> dict[str, list[tuple[Obj, str]]]:
    """Node -> [(device, pool)] of the driver's shareable GPUs with a memory capacity."""
    out: dict[str, list[tuple[Obj, str]]] = {}
    for s in slices:
        spec = s.get("spec") or {}
        if spec.get("driver") != driver or not spec.get("nodeName"):
            continue
        pool = (spec.get("pool") or {}).get("name", "")
        for d in spec.get("devices") or []:
            attrs = d.get("attributes") or {}
            kind = (attrs.get("type") or {}).get("string", "gpu")
            if kind != "gpu" or "memory" not in (d.get("capacity") or {}):
                continue
            out.setdefault(spec["nodeName"], []).append((d, pool))
    return out


def dra_available(slices: Iterable[Obj], driver: str) -> bool:
    """True when the driver publishes GPUs with consumable memory (``auto`` picks DRA)."""
    return any(d.get("allowMultipleAllocations")
               for devs in slice_devices(slices, driver).values() for d, _ in devs)


def _dra_nodes(nodes: Mapping[str, Obj], slices: Iterable[Obj], driver: str,
               devices: dict[tuple[str, int], Device],
               states: Mapping[str, tuple[bool, bool, str]], reserved: int) -> list[Node]:
    out = []
    for node_name, devs in sorted(slice_devices(slices, driver).items()):
        node = nodes.get(node_name)
        if node is None:
            continue  # a slice outlives its node for a moment; the node decides
        devs = sorted(devs, key=lambda dp: _device_number(dp[0]["name"]))
        products, memories = set(), []
        for i, (d, pool) in enumerate(devs):
            attrs = d.get("attributes") or {}
            name = (attrs.get("productName") or {}).get("string", "")
            uuid = (attrs.get("uuid") or {}).get("string", "")
            devices[(node_name, i)] = Device(d["name"], pool, uuid, name)
            products.add(dra_product(name) if name else "unknown")
            memories.append(parse_bytes(d["capacity"]["memory"]["value"]))
        state = states[node_name]
        # All GPUs of a node are one product; should a driver say otherwise, the node is
        # described by the smallest GPU and its first product name.
        bandwidth, tflops = label_overrides(node["metadata"].get("labels") or {})
        out.append(Node(node_name, sorted(products)[0], len(devs), min(memories),
                        cordoned=state.keeps_only, ready=state.ready, bandwidth_gbps=bandwidth,
                        bf16_tflops=tflops, max_pods=max_pods(node, reserved)))
    return out


def live_by_model(view: ClusterView) -> dict[str, list[ReplicaObjects]]:
    """Model key -> its replicas that have a pod not being deleted (draining included),
    grouped once for the per-Model work of a pass."""
    out: dict[str, list[ReplicaObjects]] = {}
    for r in view.replicas.values():
        if not r.terminating and r.pod is not None:
            out.setdefault(r.model, []).append(r)
    return out


def _replica_key(obj: Obj) -> str:
    meta = obj["metadata"]
    return model_key(meta["namespace"], meta["name"])


def _ours(obj: Obj) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return labels.get(MANAGED_BY) == MANAGER and LABEL_MODEL in labels


def _planned_gpus(obj: Obj) -> tuple[int, ...]:
    raw = (obj["metadata"].get("annotations") or {}).get(ANN_GPUS, "")
    try:
        return tuple(int(g) for g in raw.split(",") if g != "")
    except ValueError:
        return ()


def _allocated(claim: Obj, driver: str) -> list[tuple[str, str, int | None]]:
    """(pool, device, consumed memory bytes or None) of a claim's allocation."""
    results = (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get(
        "results") or []
    out = []
    for r in results:
        if r.get("driver") != driver:
            continue
        consumed = (r.get("consumedCapacity") or {}).get("memory")
        out.append((r.get("pool", ""), r.get("device", ""),
                    parse_bytes(consumed) if consumed is not None else None))
    return out


def cluster_view(nodes: Iterable[Obj], slices: Iterable[Obj], pods: Iterable[Obj],
                 claims: Iterable[Obj], mode: str, driver: str = "gpu.nvidia.com",
                 now_s: float | None = None, not_ready_grace: float = 0.0,
                 reserved_pods: int = 0, services: Iterable[Obj] = (),
                 pools: Iterable[Obj] | None = None) -> ClusterView:
    """The placement snapshot and the replica objects, from raw API objects (``now_s``
    and ``not_ready_grace``: see :func:`node_state`; ``reserved_pods``: see
    :func:`max_pods`; ``services``: the Models' Services; ``pools``: their
    InferencePools, None where none are to be made)."""
    by_name = {n["metadata"]["name"]: n for n in nodes}
    states = {name: node_state(obj, now_s, not_ready_grace) for name, obj in by_name.items()}
    devices: dict[tuple[str, int], Device] = {}
    if mode == "dra":
        gpu_nodes = _dra_nodes(by_name, slices, driver, devices, states, reserved_pods)
    else:
        gpu_nodes = [g for g in (_gpu_node(obj, states[name], reserved_pods)
                                 for name, obj in by_name.items()) if g is not None]
        gpu_nodes.sort(key=lambda n: n.name)
    # Nodes whose replicas are lost, or removed without a drain (their workers may not
    # answer); and those whose replicas move off, make-before-break.
    problems = {name: st.why for name, st in states.items() if not st.ready or st.unreachable}
    evacuate = frozenset(name for name, st in states.items() if st.evacuate)
    where = {(d.pool, d.name): (node, i) for (node, i), d in devices.items()}
    hbm_of = {n.name: n.gpu_hbm for n in gpu_nodes}

    replicas: dict[str, ReplicaObjects] = {}
    for pod in pods:
        if not _ours(pod):
            continue
        key = _replica_key(pod)
        model = model_key(pod["metadata"]["namespace"], pod["metadata"]["labels"][LABEL_MODEL])
        replicas[key] = ReplicaObjects(key, model, pod=pod)
    foreign: list[Existing] = []
    for claim in claims:
        if _ours(claim):
            key = _replica_key(claim)
            model = model_key(claim["metadata"]["namespace"],
                              claim["metadata"]["labels"][LABEL_MODEL])
            replicas.setdefault(key, ReplicaObjects(key, model)).claim = claim
            continue
        if mode != "dra":
            continue
        # Another workload's claim on our GPUs: its memory is not free for replicas.
        by_node: dict[str, list[tuple[int, int]]] = {}
        for pool, dev, consumed in _allocated(claim, driver):
            if (pool, dev) not in where:
                continue
            node, i = where[(pool, dev)]
            by_node.setdefault(node, []).append((i, hbm_of[node] if consumed is None else consumed))
        for node, used in by_node.items():
            foreign.append(Existing(f"{FOREIGN}/{_replica_key(claim)}@{node}", FOREIGN, node,
                                    tuple(i for i, _ in used), max(h for _, h in used)))

    existing = [e for r in replicas.values() if (e := _existing(r, where, driver))]
    served = frozenset(model_key(s["metadata"]["namespace"], s["metadata"]["name"])
                       for s in services if _ours(s)
                       and not s["metadata"].get("deletionTimestamp"))
    pooled = None if pools is None else {
        model_key(p["metadata"]["namespace"], p["metadata"]["name"]): p
        for p in pools if _ours(p)}
    return ClusterView(Snapshot(tuple(gpu_nodes), tuple(existing + foreign)), devices,
                       replicas, problems, served, evacuate, pooled)


def inference_pool_served(crds: Iterable[Obj]) -> bool:
    """Whether the API server serves InferencePool at the version kvpilot writes: its
    CRD (the Gateway API Inference Extension's) is Established, not being deleted, and
    serves that version."""
    for crd in crds:
        meta = crd.get("metadata") or {}
        if meta.get("name") != POOL_CRD or meta.get("deletionTimestamp"):
            continue
        versions = (crd.get("spec") or {}).get("versions") or []
        conditions = (crd.get("status") or {}).get("conditions") or []
        return (any(v.get("name") == POOL_VERSION and v.get("served") for v in versions)
                and any(c.get("type") == "Established" and c.get("status") == "True"
                        for c in conditions))
    return False


def _existing(r: ReplicaObjects, where: Mapping[tuple[str, str], tuple[str, int]],
               driver: str) -> Existing | None:
    """The replica as placement sees it: where it is bound or allocated, else planned.

    A terminating replica is not existing: its HBM frees up as it goes, and a new one
    may be planned in its place (the kube-scheduler, in DRA mode, waits for the memory).
    """
    if r.terminating:
        return None
    src = r.pod or r.claim
    meta = src["metadata"]
    annotations = meta.get("annotations") or {}
    node = ((r.pod or {}).get("spec") or {}).get("nodeName") or annotations.get(ANN_NODE, "")
    gpus = _planned_gpus(src)
    if r.claim is not None:
        found = [where.get((pool, dev)) for pool, dev, _ in _allocated(r.claim, driver)]
        if found and None not in found and len({n for n, _ in found}) == 1:
            node = found[0][0]  # what the kube-scheduler allocated beats what was planned
            gpus = tuple(sorted(i for _, i in found))
    try:
        hbm = int(annotations.get(ANN_HBM, "0"))
    except ValueError:
        hbm = 0
    if not node or not gpus or hbm <= 0:
        return None
    return Existing(r.key, DRAINING + r.model if r.drain_started else r.model, node, gpus, hbm)


def signature(kind: str, obj: Obj) -> tuple:
    """What a fleet pass reads of an object: two objects of equal signature plan alike,
    so a change that keeps it (a node's heartbeat, a pod's status timestamps) need not
    wake the fleet loop."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    gone = bool(meta.get("deletionTimestamp"))
    if kind == "Node":
        ready = next((c.get("status") for c in status.get("conditions") or []
                      if c.get("type") == "Ready"), None)
        return (gone, ready, bool(spec.get("unschedulable")), repr(spec.get("taints")),
                repr(sorted((meta.get("labels") or {}).items())),
                (status.get("allocatable") or {}).get(RESOURCE_GPU),
                (status.get("allocatable") or {}).get("pods"))
    if kind == "Pod":
        ready = next((c.get("status") for c in status.get("conditions") or []
                      if c.get("type") == "Ready"), None)
        return (gone, status.get("phase"), ready, status.get("podIP"), spec.get("nodeName"),
                repr(sorted((meta.get("annotations") or {}).items())),
                pod_failure(obj), fetching(obj))
    if kind == "ResourceClaim":
        return (gone, repr(status.get("allocation")), repr(meta.get("labels")))
    if kind == "Model":
        return (gone, meta.get("generation"))
    if kind in ("InferencePool", "CustomResourceDefinition"):
        # a gateway writing a pool's status, or a CRD's schema changing, plans alike
        return (gone, repr(trimmed(kind, obj)))
    return (gone, meta.get("resourceVersion"))  # ResourceSlices: rare, always read


def _pick(d: Obj | None, *keys: str) -> dict:
    return {k: d[k] for k in keys if d and k in d}


def _condition(c: Obj) -> dict:
    """A pod condition as the operator reads it: why the scheduler left it Pending is
    kept (a missing volume is shown on the Model), other messages are not."""
    if c.get("type") == "PodScheduled" and c.get("status") == "False":
        return _pick(c, "type", "status", "message")
    return _pick(c, "type", "status")


def trimmed(kind: str, obj: Obj) -> dict:
    """The parts of an object the operator reads, for its indexes: a worker pod carries
    its Model's spec in its env, a node its images and heartbeat times, and thousands of
    them are held in memory. Models and ResourceSlices are kept whole; of a CRD, only
    what says which versions it serves."""
    meta = obj.get("metadata") or {}
    if kind == "Node":
        status = obj.get("status") or {}
        return {"metadata": _pick(meta, "name", "labels", "deletionTimestamp"),
                "spec": _pick(obj.get("spec"), "unschedulable", "taints"),
                "status": {"allocatable": status.get("allocatable") or {},
                           "conditions": [_pick(c, "type", "status", "lastTransitionTime")
                                          for c in status.get("conditions") or []]}}
    if kind in ("Pod", "ResourceClaim"):
        status = obj.get("status") or {}
        out = {"kind": kind,
               "metadata": _pick(meta, "name", "namespace", "labels", "annotations",
                                 "deletionTimestamp", "creationTimestamp")}
        if kind == "Pod":
            out["spec"] = _pick(obj.get("spec"), "nodeName")
            out["status"] = {**_pick(status, "phase", "podIP"),
                             "conditions": [_condition(c)
                                            for c in status.get("conditions") or []]}
            for key in ("initContainerStatuses", "containerStatuses"):
                if status.get(key):
                    out["status"][key] = [_pick(c, "name", "restartCount", "state", "lastState")
                                          for c in status[key]]
        else:
            out["status"] = _pick(status, "allocation")
        return out
    if kind == "InferencePool":
        return {"kind": kind,
                "metadata": _pick(meta, "name", "namespace", "labels", "deletionTimestamp"),
                "spec": dict(obj.get("spec") or {})}
    if kind == "CustomResourceDefinition":  # its schema alone can be 100 kB
        return {"metadata": _pick(meta, "name", "deletionTimestamp"),
                "spec": {"versions": [_pick(v, "name", "served")
                                      for v in (obj.get("spec") or {}).get("versions") or []]},
                "status": {"conditions": [_pick(c, "type", "status") for c in
                                          (obj.get("status") or {}).get("conditions") or []]}}
    return dict(obj)
