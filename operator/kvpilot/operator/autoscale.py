"""``autoscale(window, policy, state) -> Decision``: replicas from KV-cache pressure.

A pure function of a window of samples (what the scraper saw), the Model's autoscaling
policy and a little state (when it last scaled). The operator calls it after every
scrape round; the simulator calls the same function on simulated samples.

The rule, in the spirit of the HorizontalPodAutoscaler:

* Each sample recommends ``ceil(replicas x pressure / target)``, where pressure is KV in
  use over KV capacity across the replicas that answered. Within 10% of the target it
  recommends the current count (no churn for noise).
* Requests waiting for admission mean the workers take no more, whatever the pressure:
  their pages or their batch slots are full (short requests fill a batch long before
  its pages). Such a sample recommends at least ``ceil(replicas x (running + waiting) /
  running)``, the replicas that would run every request now in the workers. Preemptions
  at or above the target recommend at least one more replica.
* Scale up once every sample of the last ``scaleUpStabilizationSeconds`` recommends
  more, to the smallest of those recommendations; scale down once every sample of the
  last ``scaleDownStabilizationSeconds`` recommends fewer, to the largest. A single spike
  or dip moves nothing, and a window the scraper has not yet covered moves nothing.
* A replica that did not answer is not idle: a sample missing any replica never
  recommends fewer replicas. For scaling up it counts as empty, as the HPA counts pods
  that are not ready: it is starting, or takes load once it is back.
* Latency: a sample carries how many first tokens and inter-token gaps the workers'
  TTFT and ITL histograms saw since the previous round, and how many of them were over
  the Model's targets. A share over the targets beyond ``miss_budget`` recommends at
  least one more replica, while the replicas run more than one sequence each (a lone
  long prefill that misses its TTFT target is not fixed by another replica).
* Looking ahead: a new replica serves only a start-up later (download when the node
  does not cache the weights, load, graph capture), so a burst that arrives now is
  met by capacity asked for a start-up ago. Over the last ``trend_window`` seconds the
  demand (running and waiting requests) is fitted with a line; when it rises, the
  replicas the newest sample asks for are scaled by the demand the line projects
  ``headroom`` seconds ahead over the demand it gives now. That recommendation scales
  up at once (the fit is its own smoothing), so a burst that would outrun a start-up
  triggers capacity before the waiting queue fills; a rising trend also holds off any
  scale-down.
* Scale-down stays conservative: the whole down window must ask for fewer, no sample
  in it may miss the latency budget or miss a worker, and the trend must not rise. The
  shell drains a removed replica before deleting it.
* ``cooldownSeconds`` between two actions; steps of at most ``maxStep``; the result
  always within ``minReplicas..maxReplicas``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

TOLERANCE = 0.10


@dataclass(frozen=True)
class Sample:
    """One scrape round of one Model."""

    at: float  # seconds (monotonic or wall clock; only differences matter)
    replicas: int  # replicas the Model had (spec) when sampled
    answered: int  # workers whose metrics were read
    kv_used: int = 0  # bytes of KV in use, summed over those that answered
    kv_capacity: int = 0  # bytes of KV capacity, summed likewise
    waiting: int = 0  # requests queued for admission
    preemptions: int = 0  # preemptions since the previous sample
    running: int = 0  # requests being served
    # Latency since the previous sample, from the workers' histograms: observations,
    # and how many of them were over the Model's target (a float: a target inside a
    # histogram bucket splits it linearly, as Prometheus' histogram_quantile does).
    ttft_count: float = 0.0
    ttft_over: float = 0.0
    itl_count: float = 0.0
    itl_over: float = 0.0

    @property
    def demand(self) -> int:
        """Requests in the workers that answered: running and waiting."""
        return self.running + self.waiting

    def misses(self, budget: Optional[float]) -> Optional[str]:
        """Which latency target this sample misses beyond ``budget`` (a share of its
        observations), or None."""
        if budget is None:
            return None
        for name, count, over in (("ttft", self.ttft_count, self.ttft_over),
                                  ("itl", self.itl_count, self.itl_over)):
            if count > 0 and over / count > budget:
                return f"{name} over target for {_pct(over / count)}"
        return None

    @property
    def pressure(self) -> Optional[float]:
        return self.kv_used / self.kv_capacity if self.kv_capacity > 0 else None

    @property
    def complete(self) -> bool:
        return self.answered >= self.replicas


@dataclass(frozen=True)
class Policy:
    target: float  # KV pressure to hold, 0..1
    min_replicas: int
    max_replicas: int
    up_window: float = 0.0  # seconds of sustained pressure before scaling up
    down_window: float = 300.0
    cooldown: float = 60.0
    max_step: int = 4  # most replicas added or removed by one decision
    # Seconds ahead the demand trend is projected (the time a new replica takes to
    # serve); 0: no look-ahead.
    headroom: float = 0.0
    trend_window: float = 60.0  # seconds of samples the demand trend is fitted over
    # Share of first tokens (or of token gaps) over the Model's TTFT (ITL) target that
    # asks for another replica; None: latency is not looked at.
    miss_budget: Optional[float] = None

    @classmethod
    def of(cls, spec, headroom: float = 0.0, trend_window: float = 60.0,
           miss_budget: Optional[float] = None) -> "Policy":
        """The policy of a ``kvpilot.api.model.ModelSpec``, with the operator's
        look-ahead settings (``Settings.scale_up_headroom_seconds`` and friends)."""
        a = spec.autoscaling
        return cls(target=a.target_kv_pressure_percent / 100, min_replicas=spec.min_replicas,
                   max_replicas=spec.replica_ceiling, up_window=a.scale_up_stabilization_seconds,
                   down_window=a.scale_down_stabilization_seconds, cooldown=a.cooldown_seconds,
                   headroom=headroom, trend_window=trend_window, miss_budget=miss_budget)


def trim_window(window, policy: Policy, now: float, scrape_seconds: float) -> None:
    """Drop the samples (oldest first in ``window``, a deque) that no decision reads any
    more: older than the longest stabilization or trend window and two scrape rounds."""
    keep = max(policy.up_window, policy.down_window, policy.trend_window) + 2 * scrape_seconds
    while window and window[0].at < now - keep:
        window.popleft()


@dataclass(frozen=True)
class State:
    last_scaled_at: Optional[float] = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    direction: str  # "up", "down" or "hold"
    reason: str
    state: State

    @property
    def changed(self) -> bool:
        return self.direction != "hold"


def need(s: Sample, target: float) -> Optional[float]:
    """Replicas (unrounded) that would hold this sample's KV at the target and run every
    request it saw; None when it carries no pressure."""
    p = s.pressure
    if p is None or s.replicas <= 0:
        return None
    # Replicas that did not answer count as empty when scaling up (as the HPA counts
    # pods that are not ready yet): they are starting, or will take load once back.
    up = p if s.complete else s.kv_used / (s.kv_capacity / max(1, s.answered) * s.replicas)
    want = s.replicas * up / target
    if s.waiting > 0:
        want = max(want, s.replicas * (s.running + s.waiting) / max(1, s.running))
    return want


def recommend(s: Sample, target: float, miss_budget: Optional[float] = None
              ) -> Optional[int]:
    """Replicas this one sample asks for; None when it carries no pressure."""
    raw = need(s, target)
    if raw is None:
        return None
    p = s.pressure
    ratio = raw / s.replicas
    want = s.replicas if abs(ratio - 1) <= TOLERANCE else math.ceil(raw - 1e-9)
    if s.waiting > 0:
        want = max(want, math.ceil(raw - 1e-9))
    if s.preemptions > 0 and p >= target:
        want = max(want, s.replicas + 1)
    if s.misses(miss_budget) and s.complete and s.running > s.answered:
        # More replicas, smaller batches, shorter queues; not while one still starts,
        # or every round of a slow start would add another.
        want = max(want, s.replicas + 1)
    if not s.complete or s.misses(miss_budget):
        want = max(want, s.replicas)  # a silent worker is not an idle one; nor a slow one
    return max(want, 1)


Buckets = Sequence[tuple[float, float]]  # a histogram: (upper bound, cumulative count)


def bucket_increase(before: Optional[Buckets], now: Buckets) -> Buckets:
    """The observations of a cumulative histogram since ``before`` (None: first seen,
    so nothing of its history is this round's). A worker that restarted counts from 0
    again: its buckets fell, and all it holds is new."""
    if before is None:
        return tuple((le, 0.0) for le, _ in now)
    old = dict(before)
    if any(n < old.get(le, 0.0) for le, n in now):
        return tuple(now)
    return tuple((le, n - old.get(le, 0.0)) for le, n in now)


def over_target(buckets: Buckets, target: float) -> tuple[float, float]:
    """(observations, observations over ``target``) of cumulative buckets, +Inf last.
    Within the bucket that holds the target the count is split linearly, as
    Prometheus' ``histogram_quantile`` assumes."""
    if not buckets:
        return 0.0, 0.0
    total = buckets[-1][1]
    below, lo = 0.0, 0.0
    for le, n in buckets:
        if le >= target:
            if math.isinf(le):
                return total, total - below
            within = (n - below) * (target - lo) / (le - lo) if le > lo else n - below
            return total, total - below - within
        below, lo = n, le
    return total, 0.0


def latency_seen(workers: Sequence[tuple[Optional[Buckets], Buckets]],
                 target: Optional[float]) -> tuple[float, float]:
    """(observations, over ``target``) one scrape round adds, summed over workers given
    as (buckets last round or None, buckets now); no target: none is over."""
    count = over = 0.0
    for before, now in workers:
        c, o = over_target(bucket_increase(before, now), target if target else math.inf)
        count += c
        over += o if target else 0.0
    return count, over


@dataclass(frozen=True)
class Trend:
    """The demand line fitted over the trend window: requests now and per second."""

    demand: float  # the line's value at the newest sample
    slope: float  # requests per second
    samples: int

    def ahead(self, seconds: float) -> float:
        return self.demand + self.slope * seconds


def trend(window: Sequence[Sample], seconds: float) -> Optional[Trend]:
    """Least squares over the samples of the last ``seconds`` that every replica
    answered (a sample missing workers undercounts demand); None with fewer than
    three."""
    if not window:
        return None
    newest = window[-1].at
    pts = [(s.at, float(s.demand)) for s in window
           if s.at >= newest - seconds and s.complete and s.pressure is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    my = sum(y for _, y in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0:
        return None
    slope = sum((t - mt) * (y - my) for t, y in pts) / var
    return Trend(my + slope * (newest - mt), slope, n)


def lookahead(window: Sequence[Sample], policy: Policy) -> Optional[tuple[int, Trend]]:
    """(replicas, trend) when the demand rises: what the newest sample needs, scaled by
    the demand projected ``policy.headroom`` seconds ahead over the demand now."""
    if policy.headroom <= 0 or not window:
        return None
    t = trend(window, policy.trend_window)
    last = window[-1]
    raw = need(last, policy.target)
    if t is None or raw is None or t.slope <= 0 or t.demand <= 0:
        return None
    growth = t.ahead(policy.headroom) / max(t.demand, float(last.demand), 1.0)
    if growth <= 1 + TOLERANCE:
        return None
    return math.ceil(raw * growth - 1e-9), t


def _sustained(window: Sequence[Sample], now: float, seconds: float, current: int,
               policy: Policy, up: bool) -> Optional[tuple[int, float]]:
    """(the bound recommendation, since when) when every sample of the last ``seconds``
    asks to move in one direction and the window reaches back that far."""
    recs: list[int] = []
    since = now
    for s in reversed(window):
        r = recommend(s, policy.target, policy.miss_budget)
        if r is None or (r <= current if up else r >= current):
            break
        recs.append(r)
        since = s.at
        if now - s.at >= seconds:
            return (min(recs) if up else max(recs)), since
    return None


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def autoscale(window: Sequence[Sample], policy: Policy, current: int, state: State,
              now: Optional[float] = None) -> Decision:
    """How many replicas the Model should have now, and why."""
    if now is None:
        now = window[-1].at if window else 0.0
    lo, hi = policy.min_replicas, max(policy.min_replicas, policy.max_replicas)

    def act(n: int, direction: str, reason: str) -> Decision:
        return Decision(n, direction, reason, replace(state, last_scaled_at=now))

    def hold(reason: str) -> Decision:
        return Decision(current, "hold", reason, state)

    if current < lo:
        return act(lo, "up", f"{current} replicas < minReplicas {lo}")
    if current > hi:
        return act(hi, "down", f"{current} replicas > maxReplicas {hi}")
    if not window or recommend(window[-1], policy.target) is None:
        return hold("no KV metrics yet; holding")
    last = window[-1]
    if state.last_scaled_at is not None and now - state.last_scaled_at < policy.cooldown:
        return hold(f"cooldown: last scaled {now - state.last_scaled_at:.0f}s ago")
    up = _sustained(window, now, policy.up_window, current, policy, True)
    ahead = lookahead(window, policy)
    if up is not None or (ahead is not None and ahead[0] > current):
        now_want = up[0] if up is not None else current
        ahead_want = ahead[0] if ahead is not None else current
        want = min(hi, max(now_want, ahead_want), current + policy.max_step)
        if want <= current:
            return hold(f"kv pressure {_pct(last.pressure)} > target, at maxReplicas {hi}")
        if ahead_want > now_want:
            t = ahead[1]
            return act(want, "up", f"demand {t.demand:.0f} rising {60 * t.slope:.1f}/min: "
                       f"{t.ahead(policy.headroom):.0f} requests within the "
                       f"{policy.headroom:.0f}s headroom")
        missed = last.misses(policy.miss_budget)
        if missed and recommend(last, policy.target) <= current:
            return act(want, "up", f"{missed} (budget {_pct(policy.miss_budget)})")
        return act(want, "up", f"kv pressure {_pct(last.pressure)} > target "
                   f"{_pct(policy.target)} for {now - up[1]:.0f}s"
                   + (f", {last.waiting} waiting" if last.waiting else ""))
    if ahead is not None:
        return hold(f"demand rising {60 * ahead[1].slope:.1f}/min; not scaling down")
    down = _sustained(window, now, policy.down_window, current, policy, False)
    if down is not None:
        want = max(lo, down[0], current - policy.max_step)
        if want < current:
            return act(want, "down", f"kv pressure {_pct(last.pressure)} < target "
                       f"{_pct(policy.target)} for {now - down[1]:.0f}s")
    return hold(f"kv pressure {_pct(last.pressure)}, target {_pct(policy.target)}")
