"""What the engine knows about itself, as plain data: the engine fills an ``EngineStats``
and ``kvpilot.worker.metrics`` exports a copy of it (data first, export second)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Counts per bucket upper bound (non-cumulative; the last slot is +Inf) and a sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) pairs, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass
class EngineStats:
    model: str
    page_size: int
    kv_bytes_per_token: int  # of the cache actually allocated (all layers, K and V)
    pages_total: int
    kv_budget_bytes: int  # what placement reserved for KV (the memory model), 0 if none
    # A model with global and sliding-window layers has a second pool, of rings of pages
    # for its local layers (kvpilot.worker.block_manager): the pages above are the global
    # layers' (kv_bytes_per_token is theirs), these the local layers'.
    window_pages_total: int = 0
    window_bytes_per_token: int = 0
    window_pages_used: int = 0
    pages_used: int = 0
    pages_cached: int = 0
    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    step_read_bytes: int = 0  # weights + KV bytes the last decode step read
    draining: bool = False
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    decode_step: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))

    @property
    def capacity_tokens(self) -> int:
        return self.pages_total * self.page_size

    @property
    def capacity_bytes(self) -> int:
        return (self.capacity_tokens * self.kv_bytes_per_token
                + self.window_pages_total * self.page_size * self.window_bytes_per_token)

    @property
    def used_tokens(self) -> int:
        """Token slots in pages held by sequences (a page is held whole)."""
        return self.pages_used * self.page_size

    @property
    def used_bytes(self) -> int:
        return (self.used_tokens * self.kv_bytes_per_token
                + self.window_pages_used * self.page_size * self.window_bytes_per_token)

    @property
    def usage_ratio(self) -> float:
        """The fuller pool's share of used pages: the one that runs out first."""
        ratio = self.pages_used / self.pages_total if self.pages_total else 0.0
        if self.window_pages_total:
            ratio = max(ratio, self.window_pages_used / self.window_pages_total)
        return ratio
