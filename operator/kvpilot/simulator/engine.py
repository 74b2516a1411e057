"""The discrete-event fleet simulation.

Requests of a trace arrive at Models; a router sends each to the ready replica of its
Model with the fewest requests (running and waiting); a replica batches them as the
worker does and holds their KV cache in pages. The same ``place()`` the operator calls
decides where replicas run, and the same ``autoscale()`` how many (or, for the
baseline, the request-count rule of ``baseline``).

**A replica** works like the worker's scheduler (``kvpilot.worker.scheduler``): a
prefill step whenever waiting sequences can be admitted (first in, first out, pages for
all their tokens free, at most ``max_num_seqs`` running, at most ``max_batched_tokens``
per prefill unless one alone is longer), decode steps otherwise. A sequence whose next
token needs a page that is not free takes it from the newest running sequence, which is
preempted: its pages are freed and it waits again at the front, to be recomputed
(prompt and what it had generated). Its page pool holds what the worker's would: the
HBM budget placement reserved, or, for whole-GPU scheduling, a share of the whole GPU.

**Time.** A prefill takes ``memory.prefill_seconds`` of the prompts it admits. A decode
step takes ``memory.decode_step_seconds`` of the bytes every busy tenant of the
replica's GPUs streams (weights and the KV cache of the tokens its sequences hold: the
GPU is time-sliced, so each tenant waits for the others' bytes), the slowest of its
GPUs. Rather than one event per step, a replica runs *segments* of steps in which its
batch does not change: up to the first sequence to finish or the step whose pages run
out. A segment's step takes the bytes at its middle (the KV grows by one token per
sequence per step) and the co-tenants' bytes when it starts; a co-tenant that starts or
stops while it runs is seen from the next segment on. An arrival that a busy replica
could admit cuts its segment after the step in progress, as continuous batching would.

**Outcomes.** Every request completes or is rejected, with a reason: longer than its
Model's context; no ready replica; the replica's waiting queue full (the worker's 429);
still in a replica when its drain timed out. The run ends when the last request is
decided.

**Start-up.** A new replica serves after the download of its weights when its node's
cache does not hold them, then process start, load and graph capture
(``kvpilot.simulator.startup``; estimates until measured on a GPU), or after a fixed
``startup_seconds`` when that is set. A warm fleet's nodes hold the weights of the
replicas they start with.

**Latency signals.** Per scrape round each Model counts what its workers' TTFT and ITL
histograms would have seen: first tokens, and token gaps (a decode step, or the
prefill that held a running sequence's next token), each against the Model's target,
so ``autoscale()`` reads the same latency signal as in the operator.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from kvpilot.api.memory import (
    decode_fixed_seconds, decode_step_bytes, decode_step_seconds, kv_bytes_per_token,
    kv_capacity_tokens, prefill_seconds,
)
from kvpilot.api.model import Model, ModelSpec
from kvpilot.operator.autoscale import Policy as ScalePolicy
from kvpilot.operator.autoscale import Sample, State, autoscale, trim_window
from kvpilot.operator.placement import Existing, Node, Snapshot, demand_for, place
from kvpilot.operator.placement import Policy as PlacementPolicy
from kvpilot.simulator.baseline import CountPolicy, CountState, count_autoscale
from kvpilot.simulator.startup import StartupModel, WeightsCache, weights_key
from kvpilot.simulator.trace import Request

STARTING, SERVING, DRAINING, GONE = "starting", "serving", "draining", "gone"
# A draining replica keeps its HBM in the snapshot under another model name, so it no
# longer counts towards its Model (as the operator's view marks it).
DRAINING_PREFIX = "(draining)"

REJECT_CONTEXT = "longer than the context"
REJECT_NO_REPLICA = "no ready replica"
REJECT_QUEUE_FULL = "waiting queue full"
REJECT_DRAIN = "drain timed out"


@dataclass(frozen=True)
class Settings:
    """What the simulated operator and workers are configured with."""

    # pod created -> worker ready; None: the start-up model (download when the node's
    # cache lacks the weights, then load and graph capture), a number: every start
    startup_seconds: Optional[float] = None
    startup: StartupModel = StartupModel()
    scrape_seconds: float = 15.0  # the operator's scrape interval (and autoscale rounds)
    drain_timeout_seconds: float = 120.0
    page_size: int = 16  # tokens per KV page, as the worker
    max_num_seqs: int = 64  # the worker's default; a Model's --max-num-seqs overrides
    max_waiting: int = 256  # per replica; beyond it the worker answers 429
    max_batched_tokens: int = 8192
    warm_start: bool = True  # the first plan's replicas are ready at t = 0
    # autoscale()'s look-ahead and latency budget, as the operator's settings
    # (scale_up_headroom_seconds, demand_trend_seconds, latency_miss_budget)
    headroom_seconds: float = 60.0
    trend_seconds: float = 60.0
    latency_miss_budget: Optional[float] = 0.01

    def __post_init__(self) -> None:
        for name in ("startup_seconds", "drain_timeout_seconds", "headroom_seconds"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.trend_seconds <= 0:
            raise ValueError("trend_seconds must be > 0")
        if self.scrape_seconds <= 0 or self.page_size < 1 or self.max_num_seqs < 1:
            raise ValueError("scrape_seconds, page_size and max_num_seqs must be > 0")


@dataclass(frozen=True)
class Strategy:
    """How a fleet is scheduled: placement, page pools and the scaler.

    ``kvpilot``: replicas share GPUs by their HBM budgets (DRA mode), each worker's
    pool is its budget, replicas follow ``autoscale()`` on KV pressure.
    ``count``: whole GPUs per replica (placement with sharing off, as the device plugin
    schedules), each worker's pool is ``gpu_memory_utilization`` of its GPUs as vLLM
    sizes it, replicas follow the request-count rule with ``target_requests`` per
    Model (default: its ``concurrentSequences`` x its KV-pressure target).
    ``static``: ``replicas`` per Model, never scaled; placed as ``share_gpus`` says.
    """

    name: str
    share_gpus: bool = True
    pool: str = "budget"  # "budget" or "whole-gpu"
    scaler: str = "kv"  # "kv", "requests" or "none"
    replicas: Optional[Mapping[str, int]] = None  # initial (and, with "none", fixed)
    target_requests: Optional[Mapping[str, float]] = None
    window_seconds: float = 60.0  # the request-count moving average
    scale_down_delay_seconds: float = 30.0
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.pool not in ("budget", "whole-gpu"):
            raise ValueError(f"pool must be budget or whole-gpu: {self.pool!r}")
        if self.scaler not in ("kv", "requests", "none"):
            raise ValueError(f"scaler must be kv, requests or none: {self.scaler!r}")


def kvpilot() -> Strategy:
    return Strategy("kvpilot")


def count_based(target_requests: Optional[Mapping[str, float]] = None) -> Strategy:
    return Strategy("count-based", share_gpus=False, pool="whole-gpu", scaler="requests",
                    target_requests=target_requests)


def static(replicas: Mapping[str, int], share_gpus: bool = True) -> Strategy:
    return Strategy("static-peak", share_gpus=share_gpus, scaler="none",
                    replicas=dict(replicas))


@dataclass
class Seq:
    req: int  # index of the request in the trace
    tokens: int  # tokens whose KV it holds (prompt + generated)
    generated: int
    output: int


class Replica:
    """One simulated worker: where it runs, its pages, its batch, its segment."""

    def __init__(self, name: str, model: "ModelRun", node: Node, gpus: tuple[int, ...],
                 hbm_per_gpu: int, pages: int, settings: Settings) -> None:
        spec = model.spec
        tp = len(gpus)
        self.name, self.model, self.node, self.gpus = name, model, node, gpus
        self.tp, self.hbm_per_gpu, self.pages = tp, hbm_per_gpu, pages
        self.state = STARTING
        self.product = node.gpu
        self.weights = decode_step_bytes(spec, tp, 0, 0)
        self.per_token = decode_step_bytes(spec, tp, 1, 1) - self.weights
        self.fixed = decode_fixed_seconds(spec, tp)
        # KV bytes of one token over all its GPUs, as its metrics count them
        self.kv_token_bytes = kv_bytes_per_token(spec.architecture, spec.kv_cache_dtype, tp) * tp
        self.max_seqs = model.max_seqs or settings.max_num_seqs
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.used = 0  # pages held by running sequences (and by the prefill under way)
        self.busy = False
        self.prefill: list[Seq] = []  # the batch of the prefill under way
        self.t0 = 0.0  # segment start
        self.step = 0.0  # seconds per decode step in this segment
        self.n = 0  # decode steps the segment runs
        self.version = 0  # bumps when a scheduled segment end is superseded
        self.bytes_now = 0  # bytes per step it streams on each of its GPUs while busy

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)

    def __repr__(self) -> str:
        return f"Replica({self.name} on {self.node.name}{list(self.gpus)} {self.state})"


class ModelRun:
    """One Model in the simulation: its spec, replicas and scaler state."""

    def __init__(self, model: Model, desired: int) -> None:
        self.name = model.metadata.name
        self.spec: ModelSpec = model.spec
        self.desired = desired
        self.replicas: list[Replica] = []
        self.max_seqs = _max_num_seqs(model.spec)
        self.window: deque[Sample] = deque()
        self.state = State()
        self.count_state = CountState()
        self.preemptions = 0  # since the last scrape
        # what its workers' TTFT and ITL histograms saw since the last scrape
        self.ttft_count = self.ttft_over = self.itl_count = self.itl_over = 0
        self.starts = 0  # replicas started after t = 0
        self.cached_starts = 0  # of them, on a node that held the weights
        self.start_seconds = 0.0  # summed over those starts
        sla = model.spec.sla
        self.context = sla.context_tokens
        self.ttft = None if sla.ttft_milliseconds is None else sla.ttft_milliseconds / 1000
        self.itl = (None if sla.inter_token_latency_milliseconds is None
                    else sla.inter_token_latency_milliseconds / 1000)


def _max_num_seqs(spec: ModelSpec) -> Optional[int]:
    """``--max-num-seqs`` from the Model's engine arguments, as the worker would parse it."""
    args = list(spec.worker.engine_args)
    for i, a in enumerate(args):
        if a.startswith("--max-num-seqs="):
            return int(a.split("=", 1)[1])
        if a == "--max-num-seqs" and i + 1 < len(args):
            return int(args[i + 1])
    return None


@dataclass
class Point:
    """The fleet at one scrape: per Model (replicas serving, starting, desired, KV
    pressure or None), GPUs in use."""

    t: float
    gpus: int
    models: dict[str, tuple[int, int, int, Optional[float]]]


@dataclass
class Result:
    strategy: str
    requests: Sequence[Request]
    first_token: list[Optional[float]]
    finish: list[Optional[float]]
    rejected: list[Optional[str]]
    preempted: list[int]
    targets: Mapping[str, tuple[Optional[float], Optional[float]]]  # model -> (ttft, itl) s
    gpu_seconds: float
    end: float
    timeline: list[Point] = field(default_factory=list)
    peak_replicas: dict[str, int] = field(default_factory=dict)
    peak_gpus: int = 0
    unplaced_rounds: int = 0  # reconcile rounds that left a desired replica unplaced
    # per Model: seconds its desired count sat at its maxReplicas (the cap bound)
    at_cap: dict[str, float] = field(default_factory=dict)
    # per Model: (replicas started after t = 0, of them on a node holding the weights,
    # mean seconds from created to serving)
    starts: dict[str, tuple[int, int, float]] = field(default_factory=dict)


class Simulation:
    """One run of a trace through a fleet under a strategy. ``run()`` returns the result;
    the same inputs give the same result (no randomness, every tie broken by order)."""

    def __init__(self, nodes: Sequence[Node], models: Sequence[Model],
                 requests: Sequence[Request], strategy: Strategy,
                 settings: Settings = Settings(),
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        self.nodes = tuple(nodes)
        self.strategy, self.settings, self.progress = strategy, settings, progress
        names = [m.metadata.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("a model appears twice")
        self.models: dict[str, ModelRun] = {}
        for m in models:
            spec = m.spec
            start = spec.desired_replicas  # as the operator's
            if strategy.replicas is not None and m.metadata.name in strategy.replicas:
                start = strategy.replicas[m.metadata.name]
            self.models[m.metadata.name] = ModelRun(m, start)
        unknown = sorted({r.model for r in requests} - set(self.models))
        if unknown:
            raise ValueError(f"the trace names models that are not given: {', '.join(unknown)}")
        for n in self.nodes:
            gpu = n.gpu
            if gpu.hbm_bandwidth is None or gpu.bf16_flops is None:
                raise ValueError(f"node {n.name}: bandwidth or bf16 FLOP/s of {n.product} "
                                 "unknown; state bandwidthGBps and bf16TFLOPS in the fleet")
        self.requests = list(requests)
        if any(b.t < a.t for a, b in zip(self.requests, self.requests[1:])):
            raise ValueError("the trace is not sorted by arrival time")
        self.placement = PlacementPolicy(share_gpus=strategy.share_gpus)
        n = len(self.requests)
        self.first: list[Optional[float]] = [None] * n
        self.finish: list[Optional[float]] = [None] * n
        self.rejected: list[Optional[str]] = [None] * n
        self.preempted = [0] * n
        self.decided = 0
        self.replicas: dict[str, Replica] = {}  # live (not gone), by name
        self.tenants: dict[tuple[str, int], list[Replica]] = {}
        self.load: dict[tuple[str, int], int] = {}  # bytes per step of busy tenants
        self.heap: list[tuple[float, int, str, object, int]] = []
        self.order = 0
        self.now = 0.0
        self.gpu_seconds = 0.0
        self.gpu_mark = 0.0
        self.timeline: list[Point] = []
        self.peak_replicas = {name: 0 for name in self.models}
        self.peak_gpus = 0
        self.unplaced_rounds = 0
        self.at_cap = {name: 0.0 for name in self.models}
        self.cache = WeightsCache()

    # --- events ------------------------------------------------------------------------

    def _push(self, t: float, kind: str, obj: object = None, version: int = 0) -> None:
        self.order += 1
        heapq.heappush(self.heap, (t, self.order, kind, obj, version))

    def run(self) -> Result:
        s = self.settings
        self._reconcile(0.0, warm=s.warm_start)
        self._push(s.scrape_seconds, "scrape")
        reqs = self.requests
        total, i = len(reqs), 0
        every = max(1, total // 200)
        while self.decided < total:
            if self.heap and (i >= total or self.heap[0][0] <= reqs[i].t):
                t, _, kind, obj, version = heapq.heappop(self.heap)
                self.now = t
                if kind == "segment":
                    if obj.version == version and obj.state != GONE:
                        self._end_segment(obj, t)
                elif kind == "ready":
                    if obj.state == STARTING:
                        obj.state = SERVING
                        self._start(obj, t)
                elif kind == "drain":
                    if obj.state == DRAINING:
                        self._drain_timeout(obj, t)
                elif kind == "scrape":
                    self._scrape(t)
                    self._push(t + s.scrape_seconds, "scrape")
            else:
                self.now = reqs[i].t
                self._arrive(i, reqs[i].t)
                i += 1
                if self.progress is not None and (i % every == 0 or i == total):
                    self.progress(i, total)
        self._account(self.now)
        return Result(
            self.strategy.name, self.requests, self.first, self.finish, self.rejected,
            self.preempted, {k: (m.ttft, m.itl) for k, m in self.models.items()},
            self.gpu_seconds, self.now, self.timeline, self.peak_replicas, self.peak_gpus,
            self.unplaced_rounds, self.at_cap,
            {k: (m.starts, m.cached_starts, m.start_seconds / m.starts if m.starts else 0.0)
             for k, m in self.models.items()})

    # --- requests ----------------------------------------------------------------------

    def _reject(self, i: int, why: str) -> None:
        self.rejected[i] = why
        self.decided += 1

    def _arrive(self, i: int, now: float) -> None:
        req = self.requests[i]
        m = self.models[req.model]
        if req.prompt + req.output > m.context:
            self._reject(i, REJECT_CONTEXT)
            return
        ready = [r for r in m.replicas if r.state == SERVING]
        if not ready:
            self._reject(i, REJECT_NO_REPLICA)
            return
        r = min(ready, key=lambda r: r.outstanding)  # ties: the first placed
        if len(r.waiting) >= self.settings.max_waiting:
            self._reject(i, REJECT_QUEUE_FULL)
            return
        r.waiting.append(Seq(i, req.prompt, 0, req.output))
        if not r.busy:
            self._start(r, now)
        elif not r.prefill and len(r.waiting) == 1 and self._admissible(r, r.waiting[0]):
            self._cut(r, now)

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.settings.page_size)

    def _admissible(self, r: Replica, s: Seq) -> bool:
        return (len(r.running) < r.max_seqs
                and self._pages(s.tokens + 1) <= r.pages - self._used_now(r, self.now))

    def _cut(self, r: Replica, now: float) -> None:
        """End the running decode segment after the step in progress."""
        k = min(r.n, int((now - r.t0) / r.step) + 1) if r.step > 0 else r.n
        if k < r.n:
            r.n = k
            r.version += 1
            self._push(r.t0 + k * r.step, "segment", r, r.version)

    # --- replicas: segments ------------------------------------------------------------

    def _extra_pages(self, r: Replica, steps: int) -> int:
        """Pages the running sequences need beyond what they hold after ``steps`` more
        decode steps (each adds one token to every sequence)."""
        p = self.settings.page_size
        extra = 0
        for s in r.running:
            first = (-s.tokens) % p + 1  # the step whose token opens a new page
            if steps >= first:
                extra += (steps - first) // p + 1
        return extra

    def _steps_within(self, r: Replica, free: int, most: int) -> int:
        """The most decode steps, up to ``most``, whose new pages fit in ``free``."""
        if self._extra_pages(r, most) <= free:
            return most
        lo, hi = 1, most  # extra(lo) fits, extra(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._extra_pages(r, mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _used_now(self, r: Replica, now: float) -> int:
        """Pages held at ``now``, counting the decode steps of the segment done so far."""
        if not r.busy or r.prefill or r.step <= 0:
            return r.used
        done = min(r.n, int((now - r.t0) / r.step))
        return r.used + self._extra_pages(r, done) if done > 0 else r.used

    def _set_bytes(self, r: Replica, value: int) -> None:
        if value == r.bytes_now:
            return
        for g in r.gpus:
            key = (r.node.name, g)
            self.load[key] = self.load.get(key, 0) - r.bytes_now + value
        r.bytes_now = value

    def _step_seconds(self, r: Replica, own: int) -> float:
        """One decode step of ``r`` streaming ``own`` bytes, with its busy co-tenants."""
        worst = 0
        for g in r.gpus:
            worst = max(worst, self.load.get((r.node.name, g), 0) - r.bytes_now + own)
        return decode_step_seconds(worst, r.product, r.fixed)

    def _start(self, r: Replica, now: float) -> None:
        """At a step boundary of an idle replica: prefill what can be admitted, else
        decode, else stay idle (and a draining replica with nothing left goes)."""
        r.busy, r.prefill = False, []
        s = self.settings
        if r.state == GONE or r.state == STARTING:
            return
        free = r.pages - r.used
        budget = s.max_batched_tokens
        batch: list[Seq] = []
        while r.waiting and len(r.running) + len(batch) < r.max_seqs:
            q = r.waiting[0]
            need = self._pages(q.tokens + 1)
            if need > free or (batch and q.tokens > budget):
                break
            r.waiting.popleft()
            free -= need
            budget -= q.tokens
            batch.append(q)
        if batch:
            r.used += sum(self._pages(q.tokens + 1) for q in batch)
            r.running.extend(batch)
            r.prefill = batch
            r.busy = True
            tokens = sum(q.tokens for q in r.running)
            self._set_bytes(r, r.weights + r.per_token * tokens)
            seconds = sum(prefill_seconds(r.model.spec, r.tp, r.product, q.tokens)
                          for q in batch)
            r.t0, r.step, r.n = now, 0.0, 0
            r.version += 1
            self._push(now + seconds, "segment", r, r.version)
            return
        if r.running:
            # A lone sequence always has its next page: it was admitted only if its
            # prompt and output fit the context, and every pool holds the context.
            free = r.pages - r.used
            while self._extra_pages(r, 1) > free and len(r.running) > 1:
                self._preempt(r)
                free = r.pages - r.used
            n = min(q.output - q.generated for q in r.running)
            n = self._steps_within(r, free, n)
            tokens = sum(q.tokens for q in r.running)
            own = r.weights + r.per_token * (tokens + len(r.running) * n // 2)
            r.busy = True
            r.t0, r.n = now, n
            self._set_bytes(r, own)
            r.step = self._step_seconds(r, own)
            r.version += 1
            self._push(now + n * r.step, "segment", r, r.version)
            return
        self._set_bytes(r, 0)
        if r.state == DRAINING and not r.waiting:
            self._remove(r, now)

    def _preempt(self, r: Replica) -> None:
        q = r.running.pop()  # the newest
        r.used -= self._pages(q.tokens)
        r.waiting.appendleft(q)
        self.preempted[q.req] += 1
        r.model.preemptions += 1

    def _end_segment(self, r: Replica, now: float) -> None:
        m = r.model
        if r.prefill:
            held = 0  # running sequences whose next token waited for this prefill
            for q in r.prefill:
                if q.generated == 0:
                    self.first[q.req] = now
                    m.ttft_count += 1
                    if m.ttft is not None and now - self.requests[q.req].t > m.ttft:
                        m.ttft_over += 1
                q.generated += 1
                q.tokens += 1
            held = len(r.running) - len(r.prefill)
            if held > 0:
                m.itl_count += held
                if m.itl is not None and now - r.t0 > m.itl:
                    m.itl_over += held
        else:
            k = r.n
            r.used += self._extra_pages(r, k)
            for q in r.running:
                q.generated += k
                q.tokens += k
            m.itl_count += k * len(r.running)
            if m.itl is not None and r.step > m.itl:
                m.itl_over += k * len(r.running)
        still = []
        for q in r.running:
            if q.generated >= q.output:
                r.used -= self._pages(q.tokens)
                self.finish[q.req] = now
                self.decided += 1
            else:
                still.append(q)
        r.running = still
        self._start(r, now)

    # --- replicas: lifecycle -----------------------------------------------------------

    def _account(self, now: float) -> int:
        """Add the GPU time since the last change; return the GPUs in use now."""
        in_use = sum(1 for v in self.tenants.values() if v)
        self.gpu_seconds += in_use * (now - self.gpu_mark)
        self.gpu_mark = now
        return in_use

    def _add(self, r: Replica, now: float, ready_at: float) -> None:
        self._account(now)
        self.replicas[r.name] = r
        r.model.replicas.append(r)
        for g in r.gpus:
            self.tenants.setdefault((r.node.name, g), []).append(r)
        self.peak_gpus = max(self.peak_gpus, sum(1 for v in self.tenants.values() if v))
        if ready_at <= now:
            r.state = SERVING
        else:
            self._push(ready_at, "ready", r)

    def _remove(self, r: Replica, now: float) -> None:
        self._account(now)
        self._set_bytes(r, 0)
        r.state = GONE
        r.version += 1
        del self.replicas[r.name]
        r.model.replicas.remove(r)
        for g in r.gpus:
            self.tenants[(r.node.name, g)].remove(r)

    def _drain(self, r: Replica, now: float) -> None:
        if r.state == STARTING:  # not serving yet: deleted at once, as the operator does
            self._remove(r, now)
            return
        r.state = DRAINING
        if not r.busy and not r.waiting:
            self._remove(r, now)
        else:
            self._push(now + self.settings.drain_timeout_seconds, "drain", r)

    def _drain_timeout(self, r: Replica, now: float) -> None:
        for q in [*r.running, *r.waiting]:
            self._reject(q.req, REJECT_DRAIN)
        r.running, r.waiting = [], deque()
        self._remove(r, now)

    def _pool_pages(self, spec: ModelSpec, node: Node, tp: int, hbm_per_gpu: int) -> int:
        st = self.strategy
        if st.pool == "budget":
            tokens = kv_capacity_tokens(spec, tp, hbm_per_gpu)
        else:
            tokens = kv_capacity_tokens(spec, tp, node.gpu_hbm, 1.0 - st.gpu_memory_utilization)
        return self._pages(tokens) if tokens > 0 else 0

    def _reconcile(self, now: float, warm: bool = False) -> None:
        """One fleet pass, as the operator's: every Model at its desired count, existing
        replicas kept where they run, surplus ones (the plan's removals) drained."""
        existing = tuple(
            Existing(r.name, (DRAINING_PREFIX if r.state == DRAINING else "") + r.model.name,
                     r.node.name, r.gpus, r.hbm_per_gpu)
            for r in self.replicas.values())
        snapshot = Snapshot(self.nodes, existing)
        demands = [demand_for(name, m.spec, snapshot, self.placement, replicas=m.desired)
                   for name, m in self.models.items()]
        plan = place(snapshot, demands, self.placement)
        if plan.unplaced:
            self.unplaced_rounds += 1
        by_node = {n.name: n for n in self.nodes}
        s = self.settings
        for name in plan.removals:
            r = self.replicas.get(name)
            if r is not None and r.state in (STARTING, SERVING):
                self._drain(r, now)
        for a in plan.assignments:
            if a.existing:
                continue
            m = self.models[a.model]
            node = by_node[a.node]
            pages = self._pool_pages(m.spec, node, len(a.gpus), a.hbm_per_gpu)
            r = Replica(a.replica, m, node, a.gpus, a.hbm_per_gpu, pages, s)
            key = weights_key(m.name, m.spec)
            if warm:
                self.cache.hold(node.name, key)
                self._add(r, now, now)
                continue
            start = self.cache.start(node.name, key, m.spec, len(a.gpus), now, s.startup)
            seconds = start.seconds if s.startup_seconds is None else s.startup_seconds
            m.starts += 1
            m.cached_starts += start.cached
            m.start_seconds += seconds
            self._add(r, now, now + seconds)

    # --- the scrape round --------------------------------------------------------------

    def _scrape(self, now: float) -> None:
        """One scrape round: a sample per Model, its scaler's decision, a fleet pass when
        a count changed (or a desired replica is still missing), then the timeline point
        (replicas after the pass, KV pressure as sampled)."""
        st, s = self.strategy, self.settings
        changed = False
        pressure: dict[str, Optional[float]] = {}
        for name, m in self.models.items():
            serving = [r for r in m.replicas if r.state == SERVING]
            used = sum(self._used_now(r, now) * s.page_size * r.kv_token_bytes for r in serving)
            capacity = sum(r.pages * s.page_size * r.kv_token_bytes for r in serving)
            waiting = sum(len(r.waiting) for r in serving)
            sample = Sample(now, m.desired, len(serving), used, capacity, waiting,
                            m.preemptions, sum(len(r.running) for r in serving),
                            m.ttft_count, m.ttft_over, m.itl_count, m.itl_over)
            m.preemptions = 0
            m.ttft_count = m.ttft_over = m.itl_count = m.itl_over = 0
            pressure[name] = sample.pressure
            want = m.desired
            if st.scaler == "kv" and m.spec.autoscaling.enabled:
                policy = ScalePolicy.of(m.spec, s.headroom_seconds, s.trend_seconds,
                                        s.latency_miss_budget)
                m.window.append(sample)
                trim_window(m.window, policy, now, s.scrape_seconds)  # as the scrape loop
                decision = autoscale(list(m.window), policy, m.desired, m.state, now)
                m.state = decision.state
                want = decision.replicas
            elif st.scaler == "requests" and m.spec.autoscaling.enabled:
                active = sum(r.outstanding for r in serving)
                want, m.count_state = count_autoscale(active, self._count_policy(m),
                                                      m.desired, m.count_state)
            if want != m.desired:
                m.desired = want
                changed = True
            if m.desired >= m.spec.replica_ceiling:
                self.at_cap[name] += s.scrape_seconds
        if changed or any(m.desired != sum(1 for r in m.replicas if r.state != DRAINING)
                          for m in self.models.values()):
            self._reconcile(now)
        point: dict[str, tuple[int, int, int, Optional[float]]] = {}
        for name, m in self.models.items():
            serving = sum(1 for r in m.replicas if r.state == SERVING)
            starting = sum(1 for r in m.replicas if r.state == STARTING)
            point[name] = (serving, starting, m.desired, pressure[name])
            self.peak_replicas[name] = max(self.peak_replicas[name], serving + starting)
        self.timeline.append(Point(now, self._account(now), point))

    def _count_policy(self, m: ModelRun) -> CountPolicy:
        st, spec = self.strategy, m.spec
        target = (st.target_requests or {}).get(m.name)
        if target is None:
            target = (spec.sla.concurrent_sequences
                      * spec.autoscaling.target_kv_pressure_percent / 100)
        rounds = max(1, round(st.window_seconds / self.settings.scrape_seconds))
        downs = max(1, math.ceil(st.scale_down_delay_seconds / self.settings.scrape_seconds))
        return CountPolicy(target, spec.min_replicas, spec.replica_ceiling, rounds, downs)


def simulate(nodes: Sequence[Node], models: Sequence[Model], requests: Sequence[Request],
             strategy: Strategy, settings: Settings = Settings(),
             progress: Optional[Callable[[int, int], None]] = None) -> Result:
    return Simulation(nodes, models, requests, strategy, settings, progress).run()


__all__ = [
    "DRAINING_PREFIX", "Point", "Replica", "Result", "Settings", "Simulation", "Strategy",
    "count_based", "kvpilot", "simulate", "static",
]
