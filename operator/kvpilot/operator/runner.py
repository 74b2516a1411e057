"""The fleet loop: one reconciler for all Models, woken by changes and by a timer.

Placement is global, so one loop plans every Model at once (per-Model handlers that each
called ``place()`` would race for the same GPUs). Each pass takes a snapshot of the
operator's indexes, calls the pure :func:`reconcile`, and applies its actions.

The indexes lag the API server by a watch event. So that a pass right after another
does not plan from a world without the pods it just created (or with the ones it just
deleted), the loop remembers its own recent writes (controller-runtime calls these
expectations) and lays them over the indexes until the watch catches up. Should it
still be wrong, names are deterministic: a create of an existing name is a 409, not a
duplicate.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

import httpx
from pydantic import ValidationError

from kvpilot.api import contract
from kvpilot.api.model import ModelSpec
from kvpilot.operator import metrics
from kvpilot.operator.kube import ApiError, Kube
from kvpilot.operator.objects import (
    ANN_DRAIN, LABEL_SERVING, POOL_CRD, POOL_KIND, EndpointPicker, WeightsCache,
)
from kvpilot.operator.placement import Policy
from kvpilot.operator.reconcile import Actions, Config, Delete, Patch, reconcile
from kvpilot.operator.scrape import drain
from kvpilot.operator.settings import Settings
from kvpilot.operator.view import (
    ClusterView, cluster_view, dra_available, inference_pool_served, live_by_model,
)

log = logging.getLogger("kvpilot.fleet")
EXPECTATION_SECONDS = 60.0  # after this, trust the indexes again

Obj = Mapping[str, Any]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Indexes:
    """Live views of the cluster (kopf indexes): name -> collection of objects."""

    models: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    nodes: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    pods: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    claims: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    slices: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    services: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    # Only where the settings leave InferencePools on: kvpilot's pools, and the pool CRD.
    pools: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)
    crds: Mapping[Any, Iterable[Obj]] = field(default_factory=dict)

    @staticmethod
    def items(index: Mapping[Any, Iterable[Obj]]) -> list[Obj]:
        return [obj for store in list(index.values()) for obj in list(store)]


@dataclass
class PassResult:
    actions: Actions
    mode: str
    seconds: float
    view: ClusterView


def _key(obj: Obj) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj.get("kind", ""), meta.get("namespace", ""), meta["name"]


class Fleet:
    """Runs passes; ``wake()`` asks for one soon, ``ready`` opens the loop."""

    def __init__(self, kube: Kube, settings: Settings, indexes: Indexes,
                 on_pass: Callable[[PassResult], None] | None = None) -> None:
        self.kube, self.settings, self.indexes = kube, settings, indexes
        self.ready = asyncio.Event()  # set once kopf has listed every indexed kind
        self.woken = asyncio.Event()
        self.on_pass = on_pass
        self.created: dict[tuple[str, str, str], tuple[float, dict]] = {}
        self.deleted: dict[tuple[str, str, str], float] = {}
        self.passes = 0
        self.last: PassResult | None = None
        self.drain_silent: dict[str, int] = {}  # replica key -> drain asks unanswered
        self.pools_served: bool | None = None  # as the last pass found it; None: not yet
        self.client = httpx.AsyncClient()  # to the workers, for drains

    def wake(self) -> None:
        self.woken.set()

    async def run(self) -> None:
        await self.ready.wait()
        log.info("indexes populated; fleet loop running")
        while True:
            self.woken.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not end the loop; the next one retries
                log.exception("fleet pass failed")
            try:
                await asyncio.wait_for(self.woken.wait(), self.interval())
                await asyncio.sleep(self.settings.debounce_seconds)  # gather a burst
            except asyncio.TimeoutError:
                pass

    def interval(self) -> float:
        """Seconds to the next pass unless something changes: while workers drain, their
        progress is asked every scrape interval; otherwise every reconcile interval."""
        s = self.settings
        draining = self.last is not None and any(
            r.drain_started and not r.terminating for r in self.last.view.replicas.values())
        return min(s.scrape_seconds, s.reconcile_seconds) if draining else s.reconcile_seconds

    def mode(self, slices: list[Obj]) -> str:
        if self.settings.mode != "auto":
            return self.settings.mode
        return "dra" if dra_available(slices, self.settings.dra_driver) else "devicePlugin"

    def config(self, mode: str) -> Config:
        s = self.settings
        return Config(mode=mode, policy=Policy(packing=s.packing, reserve=s.reserve),
                      device_class=s.device_class, driver=s.dra_driver,
                      worker_port=s.worker_port, worker_command=s.worker_command,
                      worker_image=s.worker_image, drain_seconds=s.drain_timeout_seconds,
                      cache=WeightsCache(host_path=s.weights_cache_dir,
                                         hub_endpoint=s.hub_endpoint),
                      picker=EndpointPicker(s.endpoint_picker, s.endpoint_picker_port,
                                            s.endpoint_picker_failure_mode))

    def pools_wanted(self, crds: list[Obj]) -> bool:
        """Whether this pass makes InferencePools: the settings allow them and the API
        server serves them (read from the watched CRD, so no request per pass). Said in
        the log when it changes."""
        if self.settings.inference_pool == "false":
            return False
        served = inference_pool_served(crds)
        if served != self.pools_served:
            if served:
                log.info("%s is served: an InferencePool per Model", POOL_CRD)
            elif self.settings.inference_pool == "true":
                log.warning("%s is not served (the Gateway API Inference Extension's CRDs "
                            "are not installed): no InferencePools until it is", POOL_CRD)
            else:
                log.info("%s is not served: no InferencePools", POOL_CRD)
            self.pools_served = served
        return served

    def _overlay(self, kind: str, objects: list[Obj]) -> list[Obj]:
        """The index's objects with this loop's recent writes laid over them."""
        now = time.monotonic()
        seen = {_key({**o, "kind": kind}) for o in objects}
        out = []
        for o in objects:
            k = _key({**o, "kind": kind})
            if k in self.deleted and not o["metadata"].get("deletionTimestamp"):
                if now - self.deleted[k] < EXPECTATION_SECONDS:
                    o = copy.copy(o)
                    o["metadata"] = {**o["metadata"], "deletionTimestamp": "expected"}
                else:
                    del self.deleted[k]
            out.append(o)
        for k, (at, obj) in list(self.created.items()):
            if k[0] != kind:
                continue
            if k in seen or now - at > EXPECTATION_SECONDS:
                del self.created[k]
            else:
                out.append(obj)
        for k in [k for k in self.deleted if k[0] == kind and k not in seen]:
            del self.deleted[k]  # the watch saw it go
        return out

    async def reconcile_once(self) -> PassResult:
        started = time.monotonic()
        ix = self.indexes
        slices = ix.items(ix.slices)
        mode = self.mode(slices)
        # The snapshot is taken here, on the event loop; the decision (placement can take a
        # while on a large fleet) runs on a thread, so kopf keeps serving its watches.
        nodes, models = ix.items(ix.nodes), ix.items(ix.models)
        pods = self._overlay("Pod", ix.items(ix.pods))
        claims = self._overlay("ResourceClaim", ix.items(ix.claims))
        services = self._overlay("Service", ix.items(ix.services))
        pools = (self._overlay(POOL_KIND, ix.items(ix.pools))
                 if self.pools_wanted(ix.items(ix.crds)) else None)
        view = await asyncio.to_thread(cluster_view, nodes, slices, pods, claims, mode,
                                       self.settings.dra_driver, time.time(),
                                       self.settings.not_ready_grace_seconds,
                                       self.settings.reserved_pods_per_node, services, pools)
        drained = await self.drain_progress(view)
        actions = await asyncio.to_thread(reconcile, models, view, self.config(mode),
                                          utc_now(), drained)
        writes = self.kube.writes
        await self.apply(actions, view)
        result = PassResult(actions, mode, time.monotonic() - started, view)
        self.passes += 1
        self.last = result
        self.observe(result, models)
        metrics.API_WRITES.inc(self.kube.writes - writes)
        if actions.writes:
            log.info("pass %d (%s): %d created, %d deleted, %d patched, %d statuses, "
                     "%d events in %.2fs", self.passes, mode, len(actions.creates),
                     len(actions.deletes), len(actions.patches), len(actions.statuses),
                     len(actions.events), result.seconds)
        if self.on_pass is not None:
            self.on_pass(result)
        return result

    def observe(self, result: PassResult, models: list[Obj]) -> None:
        metrics.RECONCILE_SECONDS.observe(result.seconds)
        snap = result.view.snapshot
        metrics.observe_nodes(snap.nodes, snap.replicas)
        plan = result.actions.plan
        live = live_by_model(result.view)
        placed = Counter(a.model for a in plan.assignments) if plan else Counter()
        not_placed = Counter(u.model for u in plan.unplaced) if plan else Counter()
        for raw in models:
            ns, name = raw["metadata"]["namespace"], raw["metadata"]["name"]
            key = f"{ns}/{name}"
            if raw["metadata"].get("deletionTimestamp"):
                metrics.forget(ns, name)
                continue
            reps = [r for r in live.get(key, []) if not r.drain_started]
            try:
                spec = ModelSpec.model_validate(raw.get("spec") or {})
                desired = spec.desired_replicas
                metrics.observe_targets(ns, name, spec)
            except ValidationError:
                desired = 0
            # A Model placement never saw (its worker cannot serve it) has all unplaced.
            demanded = key in placed or key in not_placed
            unplaced = not_placed[key] if demanded else desired
            metrics.ACTUAL.labels(ns, name).set(len(reps))
            metrics.READY.labels(ns, name).set(sum(1 for r in reps if r.ready))
            metrics.DESIRED.labels(ns, name).set(desired)
            metrics.UNPLACED.labels(ns, name).set(unplaced)
            if unplaced:
                metrics.PLACEMENT_FAILURES.labels(ns, name).inc()

    async def drain_progress(self, view: ClusterView) -> dict[str, bool]:
        """Replica key -> drained, for replicas being drained. Asking again (POST) is
        idempotent, and starts the drain should the operator have stopped between
        marking the pod and telling its worker."""
        draining = [r for r in view.replicas.values()
                    if r.drain_started and r.ip and not r.terminating]
        answers = await asyncio.gather(*(
            drain(self.client, r.ip, self.settings.worker_port,
                  self.settings.scrape_timeout_seconds) for r in draining))
        keys = {r.key for r in draining}
        self.drain_silent = {k: n for k, n in self.drain_silent.items() if k in keys}
        for r, a in zip(draining, answers):
            self._drain_answered(r.key, r.ip, a)
        return {r.key: bool(a) for r, a in zip(draining, answers)}

    def _drain_answered(self, key: str, ip: str | None, answer: bool | None) -> None:
        """Log a worker that does not answer its drain: the first time, then every tenth
        ask (one a scrape interval), until it answers or its drain times out."""
        if answer is not None:
            self.drain_silent.pop(key, None)
            return
        n = self.drain_silent[key] = self.drain_silent.get(key, 0) + 1
        if n % 10 == 1:
            log.warning("drain %s: the worker at %s:%d does not answer POST %s (%d time(s)); "
                        "asking again, it is removed after the drain timeout (%.0fs)", key,
                        ip, self.settings.worker_port, contract.PATH_DRAIN, n,
                        self.settings.drain_timeout_seconds)

    async def apply(self, actions: Actions, view: ClusterView | None = None) -> None:
        # Deletes first: they free HBM the creates may be planned into (DRA: the scheduler
        # holds a new claim Pending until the old one is gone, never overcommitting).
        await asyncio.gather(*(self._delete(d) for d in actions.deletes))
        groups: dict[tuple[str, str, str], list[dict]] = {}
        for obj in actions.creates:  # a replica's claim, then its pod, in order
            kind = "replica" if obj["kind"] in ("Pod", "ResourceClaim") else obj["kind"]
            groups.setdefault((kind, obj["metadata"]["namespace"], obj["metadata"]["name"]),
                              []).append(obj)
        await asyncio.gather(*(self._create_in_order(objs) for objs in groups.values()))
        await asyncio.gather(*(self._patch(p) for p in actions.patches))
        await asyncio.gather(*(self._drain(ns, name, view) for ns, name in actions.drains))
        await asyncio.gather(*(self._status(ns, name, status)
                               for ns, name, status in actions.statuses))
        await asyncio.gather(*(self._event(e) for e in actions.events))

    async def _create_in_order(self, objs: list[dict]) -> None:
        for obj in objs:
            try:
                made = await self.kube.create(obj)
            except ApiError as err:
                log.warning("create %s %s/%s: %s", obj["kind"], obj["metadata"]["namespace"],
                            obj["metadata"]["name"], err)
                return  # not the pod without its claim; the next pass retries
            if made is not None:
                self.created[_key(obj)] = (time.monotonic(), made)

    async def _drain(self, namespace: str, name: str, view: ClusterView | None) -> None:
        """Mark the pod (so the drain survives a restart) and take it out of its Model's
        Service, then tell its worker."""
        try:
            await self.kube.patch("Pod", namespace, name, {"metadata": {
                "annotations": {ANN_DRAIN: utc_now()}, "labels": {LABEL_SERVING: "false"}}})
        except ApiError as err:
            log.warning("drain %s/%s: %s", namespace, name, err)
            return
        r = view.replicas.get(f"{namespace}/{name}") if view else None
        if r is not None and r.ip:
            self._drain_answered(r.key, r.ip, await drain(
                self.client, r.ip, self.settings.worker_port,
                self.settings.scrape_timeout_seconds))

    async def _delete(self, d: Delete) -> None:
        try:
            await self.kube.delete(d.kind, d.namespace, d.name)
            self.deleted[(d.kind, d.namespace, d.name)] = time.monotonic()
        except ApiError as err:
            log.warning("delete %s %s/%s: %s", d.kind, d.namespace, d.name, err)

    async def _patch(self, p: Patch) -> None:
        try:
            await self.kube.patch(p.kind, p.namespace, p.name, p.body)
        except ApiError as err:
            log.warning("patch %s %s/%s: %s", p.kind, p.namespace, p.name, err)

    async def _status(self, namespace: str, name: str, status: dict) -> None:
        try:
            await self.kube.patch("Model", namespace, name, {"status": status}, sub="status")
        except ApiError as err:
            if err.status != 404:  # a Model deleted meanwhile needs no status
                log.warning("status of model %s/%s: %s", namespace, name, err)

    async def _event(self, event: dict) -> None:
        try:
            await self.kube.create(event)
        except ApiError as err:
            log.warning("event %s: %s", event.get("reason"), err)

    async def close(self) -> None:
        await self.client.aclose()
