"""One pass of the fleet reconciler, as a pure function: what is -> what to write.

``reconcile(models, view, config, now) -> Actions`` plans every Model at once (placement
is global: all Models compete for the same GPUs), keeping existing replicas where they
run, and returns the difference: objects to create, objects to delete, objects that
drifted to patch (InferencePools), statuses that changed and events to post. A second
pass over the same world returns nothing, so an idle operator makes no API writes.

Level-triggered: nothing here remembers a previous pass. Names are deterministic (the
plan names a replica ``<model>-<i>``, the lowest index not taken), so a pass repeated
after a crash creates what is missing and nothing twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from kvpilot.api.files import one_line
from kvpilot.api.memory import kv_capacity_tokens, usable_hbm
from kvpilot.api.model import MAX_MODEL_NAME, ModelSpec
from kvpilot.api.support import worker_support_problem
from kvpilot.api.quantity import format_bytes
from kvpilot.operator.objects import (
    POOL_KIND, Device, EndpointPicker, Replica, WeightsCache, claim_for, condition, endpoint,
    event_for, inference_pool_for, inference_pool_patch, pod_for, selector_string,
    service_for, spec_hash,
)
from kvpilot.operator.placement import (
    Assignment, Crowded, Demand, Plan, Policy, Snapshot, Unplaced, demand_for, place, servable,
)
from kvpilot.operator.view import (
    DRAINING, ClusterView, ReplicaObjects, epoch, live_by_model, model_key, split_key,
)

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """What a pass needs from the operator's settings."""

    mode: str  # "dra" or "devicePlugin" (``auto`` is resolved before a pass)
    policy: Policy = Policy()
    device_class: str = "gpu.nvidia.com"
    driver: str = "gpu.nvidia.com"
    worker_port: int = 8000
    worker_command: tuple[str, ...] = ("python", "-m", "kvpilot.worker")
    worker_image: str | None = None
    drain_seconds: float = 120
    cache: WeightsCache = WeightsCache()
    picker: EndpointPicker = EndpointPicker()  # the one every InferencePool names


@dataclass(frozen=True)
class Delete:
    kind: str  # "Pod" or "ResourceClaim"
    namespace: str
    name: str


@dataclass(frozen=True)
class Patch:
    """A JSON merge patch of an object that drifted from what its builder makes."""

    kind: str  # "InferencePool"
    namespace: str
    name: str
    body: dict


@dataclass
class Actions:
    creates: list[dict] = field(default_factory=list)  # claims before their pods
    deletes: list[Delete] = field(default_factory=list)
    patches: list[Patch] = field(default_factory=list)
    drains: list[tuple[str, str]] = field(default_factory=list)  # pods (ns, name) to drain
    statuses: list[tuple[str, str, dict]] = field(default_factory=list)  # ns, name, status
    events: list[dict] = field(default_factory=list)
    plan: Plan | None = None

    @property
    def writes(self) -> int:
        return (len(self.creates) + len(self.deletes) + len(self.patches) + len(self.drains)
                + len(self.statuses) + len(self.events))


@dataclass
class _Model:
    raw: Obj
    key: str
    spec: ModelSpec | None
    problem: str = ""  # why the stored Model cannot be served
    reason: str = "InvalidSpec"  # the condition reason that goes with it

    @property
    def name(self) -> str:
        return self.raw["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.raw["metadata"]["namespace"]

    @property
    def deleting(self) -> bool:
        return bool(self.raw["metadata"].get("deletionTimestamp"))

    def desired(self) -> int:
        if self.deleting or self.spec is None:
            return 0
        return self.spec.desired_replicas


def parse_models(raws: Sequence[Obj]) -> list[_Model]:
    """Models as the operator serves them; a stored one it cannot serve carries why."""
    out = []
    for raw in sorted(raws, key=lambda r: (r["metadata"]["namespace"], r["metadata"]["name"])):
        name = raw["metadata"]["name"]
        key = model_key(raw["metadata"]["namespace"], name)
        try:
            spec = ModelSpec.model_validate(raw.get("spec") or {})
        except ValidationError as err:
            out.append(_Model(raw, key, None, f"spec is invalid: {one_line(err)}"))
            continue
        m = _Model(raw, key, spec)
        if len(name) > MAX_MODEL_NAME:  # stored before the API capped names
            m.problem = (f"metadata.name is {len(name)} characters; replica names need it "
                         f"at most {MAX_MODEL_NAME}")
        elif problem := worker_support_problem(spec):
            m.problem, m.reason = problem, "WorkerUnsupported"
        out.append(m)
    return out


def _valid_existing(snapshot: Snapshot) -> tuple[Snapshot, list[str]]:
    """Drop existing replicas whose GPUs the node no longer has (it shrank): lost."""
    gpus = {n.name: n.gpus for n in snapshot.nodes}
    keep, lost = [], []
    for e in snapshot.replicas:
        if e.node in gpus and any(not 0 <= g < gpus[e.node] for g in e.gpus):
            lost.append(e.name)
        else:
            keep.append(e)
    return Snapshot(snapshot.nodes, tuple(keep)), lost


def reconcile(models: Sequence[Obj], view: ClusterView, config: Config, now: str,
              drained: Mapping[str, bool] | None = None, now_s: float | None = None) -> Actions:
    """One pass. ``drained``: replica key -> its worker reported drained (for replicas
    that are draining); ``now_s``: the same moment as ``now``, in epoch seconds."""
    parsed = parse_models(models)
    by_key = {m.key: m for m in parsed}
    snapshot, lost = _valid_existing(view.snapshot)
    policy = config.policy if config.mode == "dra" else replace(config.policy, share_gpus=False)

    live = live_by_model(view)
    surge = _evacuation_surge(parsed, live, view)
    demands: list[Demand] = []
    for m in parsed:
        if m.spec is None or m.problem:
            continue  # kept as it runs: not demanded, so placement leaves it alone
        try:
            d = demand_for(m.key, m.spec, snapshot, policy,
                           replicas=m.desired() + surge.get(m.key, 0))
        except (ValueError, ArithmeticError) as err:
            m.problem, m.reason = f"cannot size a replica: {err}", "InvalidSpec"
            continue
        demands.append(servable(d, m.spec))
    rollout, replace_now = _rollout(parsed, live, view)
    snapshot = Snapshot(snapshot.nodes, tuple(
        replace(e, model=DRAINING + e.model) if e.name in rollout or e.name in replace_now
        else e for e in snapshot.replicas))
    plan = place(snapshot, demands, policy)

    actions = Actions(plan=plan)
    for key, why in rollout.items():
        m, name = by_key[view.replicas[key].model], split_key(key)[1]
        actions.drains.append(split_key(key))
        actions.events.append(event_for(m.raw, "Replacing", f"replica {name}: {why}; "
                                        "a new one is placed and this one drains", now))
    for key, why in replace_now.items():
        r = view.replicas[key]
        m, name = by_key[r.model], split_key(key)[1]
        actions.deletes.extend(_deletes(key, r))
        actions.events.append(event_for(m.raw, "Replacing", f"replica {name}: {why}; "
                                        "a new one is placed and this one is removed", now))
    # The view's own snapshot: a lost replica's node is named in its event.
    _remove(actions, by_key, view, view.snapshot, set(plan.removals), set(lost), drained,
            config, now, now_s)

    placed_by_model: dict[str, list[Assignment]] = {}
    for a in plan.assignments:
        placed_by_model.setdefault(a.model, []).append(a)
    for m in parsed:
        if not m.deleting and m.key not in view.services:
            actions.creates.append(service_for(m.name, m.namespace,
                                               m.raw["metadata"].get("uid", "")))
        if not m.deleting and view.pools is not None:
            _pool(actions, m, view.pools.get(m.key), config)
        if m.spec is None or m.deleting or m.problem:
            continue
        created = []
        for a in placed_by_model.get(m.key, []):
            made = _realize(a, m, view, config)
            actions.creates.extend(made)
            if any(o["kind"] == "Pod" for o in made) and not a.existing:
                created.append(a)
        if created:
            where = "; ".join(f"{split_key(a.replica)[1]} on {a.node} GPU "
                              f"{','.join(map(str, a.gpus))}{' (shared)' if a.shared else ''}"
                              for a in created)
            actions.events.append(event_for(
                m.raw, "Placed", f"placed {len(created)} replica(s) at "
                f"{format_bytes(created[0].hbm_per_gpu)} per GPU: {where}", now))

    unplaced_by_model: dict[str, list[Unplaced]] = {}
    for u in plan.unplaced:
        unplaced_by_model.setdefault(u.model, []).append(u)
    crowded = {c.model: c for c in plan.crowded}
    for m in parsed:
        if m.deleting:
            continue
        unplaced = unplaced_by_model.get(m.key, [])
        moving = ""
        if surge.get(m.key):  # the replacement of a replica on a cordoned node
            moving = ("; 1 more while a replica moves off a cordoned node"
                      + (f" (it has no room yet: {unplaced[0].reason})" if unplaced else ""))
            unplaced = unplaced[1:]
        placed = placed_by_model.get(m.key, [])
        kv_tokens = (replica_budget_on(placed[0], m.spec, view, config)[1]
                     if placed and m.spec is not None and not m.problem else None)
        status = status_for(m, live.get(m.key, []), placed, unplaced, now,
                            served=m.key in view.services, moving=moving,
                            kv_tokens=kv_tokens, crowded=crowded.get(m.key))
        old = m.raw.get("status") or {}
        if _comparable(status) != _comparable({k: old.get(k) for k in status}):
            actions.statuses.append((m.namespace, m.name, status))
            actions.events.extend(_transition_events(m, old, status, now))
    return actions


def _pool(actions: Actions, m: _Model, stored: Obj | None, config: Config) -> None:
    """The Model's InferencePool: made when missing, patched when it drifted from what
    kvpilot makes (one being deleted is left to go; the next pass makes it again). Like
    the Service, every Model gets one, servable or not: it selects whatever serves."""
    pool = inference_pool_for(m.name, m.namespace, m.raw["metadata"].get("uid", ""),
                              config.worker_port, config.picker)
    if stored is None:
        actions.creates.append(pool)
    elif not stored["metadata"].get("deletionTimestamp") and (
            patch := inference_pool_patch(pool, stored)):
        actions.patches.append(Patch(POOL_KIND, m.namespace, m.name, patch))


def _evacuation_surge(parsed: list[_Model], live: Mapping[str, list[ReplicaObjects]],
                      view: ClusterView) -> dict[str, int]:
    """Model key -> 1 where one more replica is wanted now because a replica of the
    Model sits on a cordoned node: make-before-break, one at a time per Model.

    While a Model has replicas on cordoned nodes, it asks one replica more than desired,
    which placement puts on another node (a cordoned node takes nothing new). Once that
    one is Ready, with every other replica of the Model Ready and none draining, the
    surge ends: the Model has one replica too many, and placement removes the one on
    the cordoned node (its first choice of a surplus), which drains before it goes.
    Then the next. Derived from the world alone, so an operator restarted at any point
    carries on.
    """
    where = {e.name: e.node for e in view.snapshot.replicas}
    out = {}
    for m in parsed:
        if m.spec is None or m.deleting or m.problem:
            continue
        mine = live.get(m.key, [])
        moving = [r for r in mine if not r.drain_started and where.get(r.key) in view.evacuate]
        if not moving or any(r.drain_started for r in mine):
            continue
        others_ready = sum(1 for r in mine if r.ready and not r.drain_started
                           and r not in moving)
        if others_ready < m.desired() - len(moving) + 1:
            out[m.key] = 1
    return out


def _rollout(parsed: list[_Model], live: Mapping[str, list[ReplicaObjects]],
             view: ClusterView) -> tuple[dict[str, str], dict[str, str]]:
    """Replicas to replace now because their Model's spec changed, as two maps of
    replica key -> why: those to drain, and those to delete at once.

    A replica that serves nothing is deleted at once when it is outdated: one that
    fails (its weights or worker, :attr:`ReplicaObjects.failure`), so a fixed spec
    reaches a Model whose replicas all crash; and a claim whose pod is gone (an operator
    stopped mid-replacement, or a deleted pod), which would otherwise get a new pod on a
    claim sized for the old spec. Otherwise one per Model at a time, and only while
    every other replica of it is Ready and none drains: the old replica drains (it serves
    what it has) while the plan places a new one in its stead, so a Model never has fewer
    serving replicas than it wants because of a rollout (when the fleet has room for one
    more).
    """
    drain, now = {}, {}
    current_hash = {m.key: spec_hash(m.raw["spec"]) for m in parsed
                    if m.spec is not None and not m.deleting and not m.problem}
    for r in view.replicas.values():
        if (r.pod is None and r.claim is not None and not r.terminating
                and r.model in current_hash and r.spec_hash != current_hash[r.model]):
            now[r.key] = "its pod is gone and its claim was made for another spec"
    for m in parsed:
        if m.key not in current_hash:
            continue
        current = current_hash[m.key]
        mine = live.get(m.key, [])
        outdated = sorted(r.key for r in mine if r.spec_hash and r.spec_hash != current)
        failing = {r.key: f for r in mine if r.key in outdated and (f := r.failure)}
        for key, f in failing.items():
            now[key] = f"the Model's spec changed and it fails ({f.reason})"
        if failing or any(r.drain_started or not r.ready for r in mine):
            continue
        if outdated:
            drain[outdated[0]] = "the Model's spec changed"
    return drain, now


def _remove(actions: Actions, by_key: dict[str, _Model], view: ClusterView,
            snapshot: Snapshot, removals: set[str], lost: set[str],
            drained: Mapping[str, bool] | None, config: Config, now: str,
            now_s: float | None) -> None:
    """Deletes, drains and their events.

    A replica beyond the desired count that is Ready is drained first (its worker stops
    admitting and finishes what it serves) and deleted once drained or after the drain
    timeout. Replicas lost with their node (``lost``), of a deleted Model, or not
    serving are deleted at once; ``removals`` are the plan's.
    """
    drained = drained or {}
    now_s = epoch(now) if now_s is None else now_s
    nodes = {n.name for n in snapshot.nodes}
    where = {e.name: e.node for e in snapshot.replicas}

    def delete(key: str, r: ReplicaObjects) -> None:
        actions.deletes.extend(_deletes(key, r))

    deleted = {(d.namespace, d.name) for d in actions.deletes}
    for key, r in view.replicas.items():
        if r.terminating or split_key(key) in deleted:
            continue
        m = by_key.get(r.model)
        name = split_key(key)[1]
        node = where.get(key, "")
        why = view.node_problems.get(node) or (
            "node is gone" if node and node not in nodes else "")
        if m is None or m.deleting:
            delete(key, r)  # its Model is gone or going: nothing left to serve
        elif key in lost or (why and key in removals):
            delete(key, r)
            actions.events.append(event_for(m.raw, "ReplicaLost", f"replica {name} on "
                                            f"{node}: {why or 'its GPUs are gone'}; placing "
                                            "it again elsewhere", now, warning=True))
        elif r.drain_started:
            elapsed = now_s - epoch(r.drain_started)
            if drained.get(key):
                delete(key, r)
                actions.events.append(event_for(m.raw, "ReplicaRemoved",
                                                f"removed replica {name}: drained", now))
            elif elapsed >= config.drain_seconds:
                delete(key, r)
                actions.events.append(event_for(
                    m.raw, "DrainTimeout", f"removed replica {name}: not drained after "
                    f"{elapsed:.0f}s (drain timeout {config.drain_seconds:.0f}s)", now,
                    warning=True))
        elif key in removals:
            if r.ready and r.ip:
                actions.drains.append(split_key(key))
                why = (f"moving off cordoned node {node}, its replacement Ready"
                       if node in view.evacuate else f"scaling down to {m.desired()}")
                actions.events.append(event_for(
                    m.raw, "Draining", f"{why}: draining replica {name} before removing it",
                    now))
            else:
                delete(key, r)
                actions.events.append(event_for(m.raw, "ReplicaRemoved",
                                                f"removed replica {name} (not serving; "
                                                f"beyond the {m.desired()} desired)", now))


def _deletes(key: str, r: ReplicaObjects) -> list[Delete]:
    """The deletes that remove a replica: its pod first (it holds the claim), then its
    claim."""
    ns, name = split_key(key)
    return ([Delete("Pod", ns, name)] if r.pod is not None else []) + (
        [Delete("ResourceClaim", ns, name)] if r.claim is not None else [])


def replica_budget_on(a: Assignment, spec: ModelSpec, view: ClusterView,
                      config: Config) -> tuple[int, int]:
    """(HBM per GPU, KV tokens) a replica's worker gets. DRA: its placement budget,
    which its claim asks and other replicas may share the rest of the GPU beside. Device
    plugin: its GPUs are its alone, so its worker sizes its KV pool from all of their
    usable HBM (``placement.reserve`` kept free)."""
    if config.mode == "dra":
        return a.hbm_per_gpu, a.kv_tokens
    gpu_hbm = next((n.gpu_hbm for n in view.snapshot.nodes if n.name == a.node), 0)
    if not gpu_hbm:
        return a.hbm_per_gpu, a.kv_tokens
    whole = usable_hbm(gpu_hbm, config.policy.reserve)
    return whole, kv_capacity_tokens(spec, a.tp, whole)


def _realize(a: Assignment, m: _Model, view: ClusterView, config: Config) -> list[dict]:
    """The claim and pod of an assignment that do not exist yet."""
    ns, name = split_key(a.replica)
    r = view.replicas.get(a.replica)
    if r is not None and r.terminating:
        return []  # the name frees once it is gone; the next pass places it again
    need_claim = config.mode == "dra" and (r is None or r.claim is None)
    if not need_claim and r is not None and r.pod is not None:
        return []  # the common case, for every running replica of every pass
    pool, kv_tokens = replica_budget_on(a, m.spec, view, config)
    replica = Replica(name, ns, m.name, m.raw["metadata"].get("uid", ""), a.node, a.gpus,
                      a.hbm_per_gpu, kv_tokens, spec_hash(m.raw["spec"]),
                      pool_hbm_per_gpu=pool if pool != a.hbm_per_gpu else 0)
    out = []
    if need_claim:
        devices = [view.devices.get((a.node, g)) for g in a.gpus]
        if None in devices:
            return []  # the node's slice changed under the plan; the next pass re-plans
        out.append(claim_for(replica, [d for d in devices if isinstance(d, Device)],
                             config.device_class, config.driver))
    if r is None or r.pod is None:
        out.append(pod_for(replica, m.spec, m.raw["spec"], mode=config.mode,
                           worker_port=config.worker_port, command=config.worker_command,
                           default_image=config.worker_image,
                           drain_seconds=config.drain_seconds, cache=config.cache))
    return out


def status_for(m: _Model, live: list[ReplicaObjects], placed: list[Assignment],
               unplaced: list[Unplaced], now: str, served: bool = False,
               moving: str = "", kv_tokens: int | None = None,
               crowded: Crowded | None = None) -> dict:
    """The Model's status after this pass (``live``: its replicas with a pod not being
    deleted; ``placed``, ``unplaced``: the plan's for it; ``served``: its Service
    exists; ``moving``: said of a replica moving off a cordoned node; ``kv_tokens``: the
    KV tokens its workers hold, :func:`replica_budget_on`; ``crowded``: the plan's word
    that some of its replicas share what its spread keeps apart): what runs, where, and
    the conditions.

    ``Degraded`` says the first thing wrong, most fundamental first: a spec that cannot
    be served, then replicas whose weights or worker fail (a crash loop is never hidden
    behind ``Ready=False``), then replicas that could not be placed."""
    old = m.raw.get("status") or {}
    conditions = old.get("conditions") or []
    gen = m.raw["metadata"].get("generation")
    mine = [r for r in live if not r.drain_started]
    ready = sum(1 for r in mine if r.ready)
    # Every key this pass owns is present; None deletes it in the merge patch.
    status: dict[str, Any] = {
        "replicas": len(mine),
        "readyReplicas": ready,
        "selector": selector_string(m.name),
        "observedGeneration": gen,
        "tensorParallel": None, "hbmPerGpu": None, "kvCapacityTokens": None,
        "placements": None, "endpoint": endpoint(m.name, m.namespace) if served else None,
        "reason": None,
    }
    if m.spec is None or m.problem:
        status["conditions"] = [condition("Degraded", True, m.reason, m.problem, gen,
                                          conditions, now)]
        status["reason"] = m.reason
        return status
    if placed:
        first = placed[0]
        status.update(tensorParallel=first.tp, hbmPerGpu=format_bytes(first.hbm_per_gpu),
                      kvCapacityTokens=first.kv_tokens if kv_tokens is None else kv_tokens)
    status["placements"] = [{"replica": split_key(a.replica)[1], "node": a.node,
                             "gpus": list(a.gpus), "shared": a.shared} for a in placed]
    desired = m.desired()
    failed = sorted((r.key, f) for r in mine if (f := r.failure) is not None)
    fetching = sum(1 for r in mine if r.fetching)
    ready_message = f"{ready} of {desired} replicas ready"
    if fetching:
        ready_message += f" ({fetching} fetching weights)"
    if failed:
        (key, first), more = failed[0], len(failed) - 1
        degraded = (first.reason, f"replica {split_key(key)[1]}: {first.message}"
                    + (f" (and {more} more replica(s) failing)" if more else ""))
    elif unplaced and placed:
        degraded = ("PartlyPlaced", f"{len(unplaced)} replica(s) could not be placed; the "
                    "placed ones keep serving")
    else:
        degraded = ("AsSpecified", "")
    cond = [
        condition("Placed", not unplaced, "AllPlaced" if not unplaced else "NotAllPlaced",
                  f"{min(len(placed), desired)} of {desired} replicas placed{moving}", gen,
                  conditions, now),
        condition("Ready", ready >= desired,
                  "ReplicasReady" if ready >= desired else "ReplicasNotReady",
                  ready_message, gen, conditions, now),
        condition("Unschedulable", bool(unplaced), "DoesNotFit" if unplaced else "Fits",
                  unplaced[0].reason if unplaced else "every desired replica has GPUs",
                  gen, conditions, now),
        condition("Degraded", degraded[0] != "AsSpecified", *degraded, gen, conditions, now),
    ]
    if m.spec.spread != "none":
        cond.append(spread_condition(m.spec.spread, placed, crowded, gen, conditions, now))
    status["conditions"] = cond
    if ready < desired:
        status["reason"] = (degraded[0] if failed else "Unschedulable" if unplaced
                            else "FetchingWeights" if fetching
                            else "Draining" if any(r.drain_started for r in live)
                            else "Starting")
    return status


def spread_condition(spread: str, placed: list[Assignment], crowded: Crowded | None,
                     gen: int | None, conditions: Sequence[Obj], now: str) -> dict:
    """``Spread``: True while no two of the Model's replicas share a node ("node") or a
    GPU ("gpu"); False, with placement's reason, while some must."""
    domain = "node" if spread == "node" else "GPU"
    if crowded is None:
        n = len(placed)
        message = (f"spread {spread}: each of {n} replicas on a {domain} of its own" if n > 1
                   else f"spread {spread}: {n} replica{'' if n == 1 else 's'}, none to keep "
                   "apart")
        return condition("Spread", True, "ReplicasApart", message, gen, conditions, now)
    return condition("Spread", False, f"ReplicasShare{'Node' if spread == 'node' else 'GPU'}",
                     f"{crowded.sharing} of {crowded.replicas} replicas share a {domain}; "
                     f"{crowded.reason}", gen, conditions, now)


def _comparable(status: Obj) -> dict:
    """The keys a pass owns, without None values, for the compare-before-patch check
    (``kvPressurePercent`` belongs to the autoscaler and is left alone)."""
    return {k: v for k, v in status.items() if v is not None}


# The node tally that ends placement's reasons, "(0/5 nodes fit: 2 cordoned, 3 ...)": it
# moves with every node that comes or goes, and says nothing new of the Model.
_TALLY = re.compile(r" \(\d+/\d+ nodes fit: [^()]*\)$")


def _without_tally(message: str) -> str:
    return _TALLY.sub("", message)


# Conditions that warn, and the status in which they do.
_WARNING_WHEN = {"Unschedulable": "True", "Degraded": "True", "Spread": "False"}


def _transition_events(m: _Model, old: Obj, new: Obj, now: str) -> list[dict]:
    """Events for conditions that turned to their warning status (``_WARNING_WHEN``), or
    whose message changed while in it (a change of the node tally alone is not news)."""
    before = {c.get("type"): c for c in old.get("conditions") or []}
    out = []
    for c in new.get("conditions") or []:
        warn = _WARNING_WHEN.get(c["type"])
        if warn is None or c["status"] != warn:
            continue
        prev = before.get(c["type"])
        if prev and prev.get("status") == warn and _without_tally(
                prev.get("message", "")) == _without_tally(c["message"]):
            continue
        out.append(event_for(m.raw, c["reason"], c["message"], now, warning=True))
    return out

