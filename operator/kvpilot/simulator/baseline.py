"""The count-based autoscaler of the baseline, as KubeAI scales models.

KubeAI's model autoscaler, every ``interval``, sums the active requests (running and
waiting) over a model's endpoints, feeds them to a simple moving average of
``timeWindow / interval`` samples and asks for ``ceil(average / targetRequests)``
replicas; it scales up at once and down only after ``scaleDownDelaySeconds / interval``
consecutive rounds asked for fewer. This is that rule as a pure function, so the
baseline is decided like kvpilot's ``autoscale()``: from a sample and a little state.

The moving average here starts empty rather than from zeros, which lets the baseline
keep its first replicas instead of scaling down while the window fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CountPolicy:
    target_requests: float  # active requests one replica should carry
    min_replicas: int
    max_replicas: int
    window: int = 6  # samples in the moving average (timeWindow / interval)
    scale_down_after: int = 3  # consecutive rounds asking for fewer before scaling down

    def __post_init__(self) -> None:
        if self.target_requests <= 0:
            raise ValueError(f"target_requests must be > 0: {self.target_requests}")
        if self.window < 1 or self.scale_down_after < 1:
            raise ValueError("window and scale_down_after must be >= 1")


@dataclass(frozen=True)
class CountState:
    history: tuple[float, ...] = ()  # the last ``window`` active-request counts
    downs: int = 0  # consecutive rounds that asked for fewer replicas


def count_autoscale(active: int, policy: CountPolicy, current: int,
                    state: CountState) -> tuple[int, CountState]:
    """Replicas after one round that saw ``active`` requests, and the new state."""
    history = (state.history + (float(active),))[-policy.window:]
    average = sum(history) / len(history)
    want = math.ceil(average / policy.target_requests)
    want = max(policy.min_replicas, min(max(policy.min_replicas, policy.max_replicas), want))
    if want < current:
        downs = state.downs + 1
        if downs >= policy.scale_down_after:
            return want, CountState(history, 0)
        return current, CountState(history, downs)
    return want, CountState(history, 0)
