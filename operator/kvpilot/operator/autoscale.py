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

    @classmethod
    def of(cls, spec) -> "Policy":
        """The policy of a ``kvpilot.api.model.ModelSpec``."""
        a = spec.autoscaling
        return cls(target=a.target_kv_pressure_percent / 100, min_replicas=spec.min_replicas,
                   max_replicas=spec.replica_ceiling, up_window=a.scale_up_stabilization_seconds,
                   down_window=a.scale_down_stabilization_seconds, cooldown=a.cooldown_seconds)


def trim_window(window, policy: Policy, now: float, scrape_seconds: float) -> None:
    """Drop the samples (oldest first in ``window``, a deque) that no decision reads any
    more: older than the longest stabilization window and two scrape rounds."""
    keep = max(policy.up_window, policy.down_window) + 2 * scrape_seconds
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


def recommend(s: Sample, target: float) -> Optional[int]:
    """Replicas this one sample asks for; None when it carries no pressure."""
    p = s.pressure
    if p is None or s.replicas <= 0:
        return None
    # Replicas that did not answer count as empty when scaling up (as the HPA counts
    # pods that are not ready yet): they are starting, or will take load once back.
    up = p if s.complete else s.kv_used / (s.kv_capacity / max(1, s.answered) * s.replicas)
    ratio = up / target
    want = s.replicas if abs(ratio - 1) <= TOLERANCE else math.ceil(s.replicas * ratio)
    if s.waiting > 0:
        want = max(want, math.ceil(s.replicas * (s.running + s.waiting) / max(1, s.running)))
    if s.preemptions > 0 and p >= target:
        want = max(want, s.replicas + 1)
    if not s.complete:
        want = max(want, s.replicas)  # a silent worker is not an idle one
    return max(want, 1)


def _sustained(window: Sequence[Sample], now: float, seconds: float, current: int,
               target: float, up: bool) -> Optional[tuple[int, float]]:
    """(the bound recommendation, since when) when every sample of the last ``seconds``
    asks to move in one direction and the window reaches back that far."""
    recs: list[int] = []
    since = now
    for s in reversed(window):
        r = recommend(s, target)
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
    up = _sustained(window, now, policy.up_window, current, policy.target, True)
    if up is not None:
        want = min(hi, up[0], current + policy.max_step)
        if want > current:
            return act(want, "up", f"kv pressure {_pct(last.pressure)} > target "
                       f"{_pct(policy.target)} for {now - up[1]:.0f}s"
                       + (f", {last.waiting} waiting" if last.waiting else ""))
        return hold(f"kv pressure {_pct(last.pressure)} > target, at maxReplicas {hi}")
    down = _sustained(window, now, policy.down_window, current, policy.target, False)
    if down is not None:
        want = max(lo, down[0], current - policy.max_step)
        if want < current:
            return act(want, "down", f"kv pressure {_pct(last.pressure)} < target "
                       f"{_pct(policy.target)} for {now - down[1]:.0f}s")
    return hold(f"kv pressure {_pct(last.pressure)}, target {_pct(policy.target)}")
