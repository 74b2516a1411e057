"""The scrape loop: read every ready worker, then let ``autoscale`` decide per Model.

Every ``scrapeSeconds`` it scrapes the ``/metrics`` of each Model's ready, non-draining
worker pods at once (short timeouts), turns them into one :class:`Sample` per Model,
writes the Model's KV pressure to its status when it changed, and, for Models with
``autoscaling.enabled``, calls :func:`autoscale` and writes a changed replica count
through the scale subresource, with an Event that carries the decision's reason.

With autoscaling enabled the operator owns ``spec.replicas``: a change made by someone
else (``kubectl scale``) is reported with an Event and overridden by the next decision.
With it disabled the operator never writes ``spec.replicas``; ``kubectl scale``, an HPA
or KEDA drive it through the scale subresource.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any, Mapping

import httpx

from kvpilot.operator import metrics
from kvpilot.operator.autoscale import (
    Policy, Sample, State, autoscale, latency_seen, trim_window,
)
from kvpilot.operator.kube import ApiError, Kube
from kvpilot.operator.objects import LABEL_MODEL, event_for
from kvpilot.operator.reconcile import parse_models
from kvpilot.operator.runner import Indexes, utc_now
from kvpilot.operator.scrape import CONCURRENCY, WorkerMetrics, scrape_all
from kvpilot.operator.settings import Settings
from kvpilot.operator.view import ReplicaObjects, model_key, split_key

log = logging.getLogger("kvpilot.scaling")
Obj = Mapping[str, Any]


def targets(pods: list[Obj]) -> dict[str, list[ReplicaObjects]]:
    """Model key -> its ready, serving (not draining, not terminating) replicas."""
    out: dict[str, list[ReplicaObjects]] = {}
    for pod in pods:
        meta = pod["metadata"]
        model = (meta.get("labels") or {}).get(LABEL_MODEL)
        if not model:
            continue
        r = ReplicaObjects(model_key(meta["namespace"], meta["name"]),
                           model_key(meta["namespace"], model), pod=pod)
        if r.ready and r.ip and not r.drain_started:
            out.setdefault(r.model, []).append(r)
    return out


def sample(at: float, replicas: int, read: list[WorkerMetrics],
           previous: Mapping[str, int], current: Mapping[str, int]) -> Sample:
    """One Model's sample from the workers that answered; preemptions as the counters'
    increase since the last round (a restarted worker's counter starts again at 0)."""
    def increase(key: str, now: int) -> int:
        before = previous.get(key)
        if before is None:
            return 0  # first seen: its history is not this round's
        return now - before if now >= before else now

    preempted = sum(increase(k, n) for k, n in current.items())
    return Sample(at, replicas, len(read), sum(m.kv_used for m in read),
                  sum(m.kv_capacity for m in read), sum(m.waiting for m in read), preempted,
                  sum(m.running for m in read))


class Scaler:
    def __init__(self, kube: Kube, settings: Settings, indexes: Indexes, ready: asyncio.Event,
                 wake_fleet) -> None:
        self.kube, self.settings, self.indexes = kube, settings, indexes
        self.ready, self.wake_fleet = ready, wake_fleet
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY))
        self.windows: dict[str, deque[Sample]] = {}
        self.states: dict[str, State] = {}
        self.counters: dict[str, int] = {}  # replica key -> preemption counter last seen
        self.histograms: dict[str, WorkerMetrics] = {}  # replica key -> last read (TTFT/ITL)
        self.written: dict[str, int] = {}  # model key -> replicas this operator last set
        self.observed: dict[str, int] = {}  # model key -> spec.replicas seen last round

    async def run(self) -> None:
        await self.ready.wait()
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad round must not end the loop
                log.exception("scrape round failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.settings.scrape_seconds - elapsed))

    async def close(self) -> None:
        await self.client.aclose()

    async def round(self) -> None:
        started = time.monotonic()
        now = time.time()
        ix = self.indexes
        by_model = targets(ix.items(ix.pods))
        jobs = [(r.key, r.ip, split_key(r.model)[1]) for rs in by_model.values() for r in rs]
        results = await scrape_all(self.client, jobs, self.settings.worker_port,
                                   self.settings.scrape_timeout_seconds)
        metrics.SCRAPE_SECONDS.observe(time.monotonic() - started)
        writes = []
        for m in parse_models(ix.items(ix.models)):
            if m.spec is None or m.deleting:
                continue
            reps = by_model.get(m.key, [])
            read, counters = [], {}
            for r in reps:
                got, error = results[r.key]
                if got is None:
                    metrics.SCRAPE_FAILURES.labels(m.namespace, m.name).inc()
                    log.debug("scrape %s: %s", r.key, error)
                    continue
                read.append(got)
                counters[r.key] = got.preemptions
            s = sample(now, m.spec.replicas, read, self.counters, counters)
            self.counters.update(counters)
            s = self._latency(m, s, [r.key for r in reps if results[r.key][0] is not None],
                              read)
            writes.extend(self._decide(m, s, now))
        await asyncio.gather(*writes)

    def _latency(self, m, s: Sample, keys: list[str], read: list[WorkerMetrics]) -> Sample:
        """``s`` with what the workers' TTFT and ITL histograms saw since last round,
        against the Model's targets."""
        sla = m.spec.sla
        ttft = None if sla.ttft_milliseconds is None else sla.ttft_milliseconds / 1000
        itl = (None if sla.inter_token_latency_milliseconds is None
               else sla.inter_token_latency_milliseconds / 1000)
        before = [self.histograms.get(k) for k in keys]
        t = latency_seen([(b.ttft if b else None, w.ttft) for b, w in zip(before, read)], ttft)
        i = latency_seen([(b.itl if b else None, w.itl) for b, w in zip(before, read)], itl)
        self.histograms.update(zip(keys, read))
        return replace(s, ttft_count=t[0], ttft_over=t[1], itl_count=i[0], itl_over=i[1])

    def _decide(self, m, s: Sample, now: float) -> list:
        """The writes one Model's sample leads to (as coroutines)."""
        out = []
        status = m.raw.get("status") or {}
        if s.pressure is not None:
            metrics.KV_PRESSURE.labels(m.namespace, m.name).set(s.pressure)
            pct = min(100, round(100 * s.pressure))
            if status.get("kvPressurePercent") != pct:
                out.append(self._patch_status(m, {"kvPressurePercent": pct}))
        if not m.spec.autoscaling.enabled:
            self.windows.pop(m.key, None)
            return out
        st = self.settings
        policy = Policy.of(m.spec, st.scale_up_headroom_seconds, st.demand_trend_seconds,
                           st.latency_miss_budget)
        window = self.windows.setdefault(m.key, deque())
        window.append(s)
        trim_window(window, policy, now, self.settings.scrape_seconds)
        current = m.spec.replicas
        seen = self.observed.get(m.key)
        self.observed[m.key] = current
        if seen is not None and current != seen and current != self.written.get(m.key):
            out.append(self._event(m, "ScaledOutsideAutoscaler", f"spec.replicas was set to "
                                   f"{current} outside the autoscaler; with autoscaling "
                                   "enabled the next decision overrides it", warning=True))
        decision = autoscale(list(window), policy, current,
                             self.states.get(m.key, State()), now)
        self.states[m.key] = decision.state
        if decision.changed:
            cause = decision.reason.split(" ")[0] if decision.reason else "?"
            metrics.SCALINGS.labels(m.namespace, m.name, decision.direction, cause).inc()
            self.written[m.key] = decision.replicas
            reason = "ScaledUp" if decision.direction == "up" else "ScaledDown"
            out.append(self._scale(m, decision.replicas))
            out.append(self._event(m, reason, f"{current} -> {decision.replicas} replicas: "
                                   f"{decision.reason}"))
        return out

    async def _scale(self, m, replicas: int) -> None:
        try:
            await self.kube.patch("Model", m.namespace, m.name, {"spec": {"replicas": replicas}},
                                  sub="scale")
            self.wake_fleet()
        except ApiError as err:
            log.warning("scale %s to %d: %s", m.key, replicas, err)

    async def _patch_status(self, m, patch: dict) -> None:
        try:
            await self.kube.patch("Model", m.namespace, m.name, {"status": patch}, sub="status")
        except ApiError as err:
            log.warning("status of %s: %s", m.key, err)

    async def _event(self, m, reason: str, message: str, warning: bool = False) -> None:
        try:
            await self.kube.create(event_for(m.raw, reason, message, utc_now(), warning))
        except ApiError as err:
            log.warning("event %s: %s", reason, err)
