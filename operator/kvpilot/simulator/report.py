"""What a run comes to: the summary figures, the table, and PNG plots.

A request **meets its SLA** when it completed, its time to first token is within the
Model's ``ttftMilliseconds`` and its mean inter-token latency (first to last token,
over the tokens after the first) within ``interTokenLatencyMilliseconds``; a target the
Model does not set is met. Rejected requests count against attainment. **Never
preempted** is the share of completed requests whose sequence was never preempted.
**GPU-hours** count every GPU that holds at least one replica (starting, serving or
draining), from the start of the trace until its last request is decided.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from kvpilot.simulator.engine import Result


@dataclass(frozen=True)
class Summary:
    strategy: str
    requests: int
    completed: int
    rejected: int
    rejected_by: dict[str, int]
    sla_met: int  # requests that completed within both targets
    ttft_met: int
    itl_met: int
    never_preempted: int  # completed requests never preempted
    gpu_hours: float
    peak_gpus: int
    ttft_p50: Optional[float]
    ttft_p99: Optional[float]
    itl_p50: Optional[float]
    itl_p99: Optional[float]
    hours: float  # simulated time

    @property
    def attainment(self) -> float:
        return self.sla_met / self.requests if self.requests else 1.0

    @property
    def never_preempted_share(self) -> float:
        return self.never_preempted / self.completed if self.completed else 1.0

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy, "requests": self.requests, "completed": self.completed,
            "rejected": self.rejected, "rejectedBy": dict(self.rejected_by),
            "slaAttainment": self.attainment, "ttftMet": self.ttft_met, "itlMet": self.itl_met,
            "neverPreemptedShare": self.never_preempted_share, "gpuHours": self.gpu_hours,
            "peakGpus": self.peak_gpus, "ttftP50": self.ttft_p50, "ttftP99": self.ttft_p99,
            "itlP50": self.itl_p50, "itlP99": self.itl_p99, "hours": self.hours,
        }


def _quantile(values: list[float], q: float) -> Optional[float]:
    """The nearest-rank quantile (no interpolation): a value that occurred."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(round(q * len(values), 9)) - 1)]


def itl(result: Result, i: int) -> Optional[float]:
    """Mean inter-token latency of request ``i``; None when not completed, 0 for one
    token."""
    first, end = result.first_token[i], result.finish[i]
    if first is None or end is None:
        return None
    n = result.requests[i].output
    return (end - first) / (n - 1) if n > 1 else 0.0


def summarize(result: Result) -> Summary:
    n = len(result.requests)
    completed = ttft_ok = itl_ok = sla = kept = 0
    ttfts: list[float] = []
    itls: list[float] = []
    for i, req in enumerate(result.requests):
        if result.finish[i] is None:
            continue
        completed += 1
        ttft = result.first_token[i] - req.t
        gap = itl(result, i)
        ttfts.append(ttft)
        itls.append(gap)
        ttft_target, itl_target = result.targets[req.model]
        a = ttft_target is None or ttft <= ttft_target
        b = itl_target is None or gap <= itl_target
        ttft_ok += a
        itl_ok += b
        sla += a and b
        kept += result.preempted[i] == 0
    rejected = Counter(r for r in result.rejected if r is not None)
    return Summary(
        result.strategy, n, completed, sum(rejected.values()), dict(sorted(rejected.items())),
        sla, ttft_ok, itl_ok, kept, result.gpu_seconds / 3600, result.peak_gpus,
        _quantile(ttfts, 0.5), _quantile(ttfts, 0.99), _quantile(itls, 0.5),
        _quantile(itls, 0.99), result.end / 3600)


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def table(summaries: Sequence[Summary]) -> str:
    """The summaries side by side, one row per strategy."""
    head = (f"{'STRATEGY':<12} {'GPU-HOURS':>9} {'PEAK GPUS':>9} {'SLA MET':>8} "
            f"{'TTFT MET':>8} {'ITL MET':>8} {'NO PREEMPT':>10} {'REJECTED':>8} "
            f"{'TTFT P50/P99 MS':>16} {'ITL P50/P99 MS':>15}")
    lines = [head]
    for s in summaries:
        n = max(1, s.requests)
        lines.append(
            f"{s.strategy:<12} {s.gpu_hours:>9.2f} {s.peak_gpus:>9} {100 * s.attainment:>7.2f}% "
            f"{100 * s.ttft_met / n:>7.2f}% {100 * s.itl_met / n:>7.2f}% "
            f"{100 * s.never_preempted_share:>9.2f}% {s.rejected:>8} "
            f"{_ms(s.ttft_p50) + '/' + _ms(s.ttft_p99):>16} "
            f"{_ms(s.itl_p50) + '/' + _ms(s.itl_p99):>15}")
    for s in summaries:
        if s.rejected_by:
            why = ", ".join(f"{k}: {v}" for k, v in s.rejected_by.items())
            lines.append(f"{s.strategy} rejected: {why}")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], out: Path) -> list[Path]:
    """PNG plots of the runs into ``out``: GPUs in use, replicas per Model, KV pressure
    per Model over time. Imports matplotlib (the ``sim`` extra) only here."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("plots need matplotlib: pip install 'kvpilot[sim]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        ax.step([p.t / 60 for p in r.timeline], [p.gpus for p in r.timeline], where="post",
                label=r.strategy)
    ax.set_xlabel("minutes")
    ax.set_ylabel("GPUs in use")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "gpus.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    for r in results:
        models = sorted({m for p in r.timeline for m in p.models})
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for m in models:
            ts = [p.t / 60 for p in r.timeline if m in p.models]
            top.step(ts, [p.models[m][0] + p.models[m][1] for p in r.timeline if m in p.models],
                     where="post", label=m)
            bottom.plot(ts, [100 * (p.models[m][3] or 0.0) for p in r.timeline
                             if m in p.models], label=m)
        top.set_ylabel("replicas")
        top.set_title(r.strategy)
        bottom.set_ylabel("KV pressure %")
        bottom.set_xlabel("minutes")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        top.legend(fontsize=6, ncol=3, loc="upper left")
        fig.tight_layout()
        path = out / f"replicas-{r.strategy}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
