"""Scores: 0-100, higher is better; a node's score is their policy-weighted mean.

GPU-level scores also choose which GPUs of the node a replica takes: the ``tp``
eligible GPUs with the best weighted GPU score. Packing vs spreading is the weight
``Policy.packing`` puts on ``most_allocated`` against the headroom scores.
"""

from __future__ import annotations

from typing import Optional

from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.state import Apart, NodeState, tighter


def gpu_most_allocated(free: int, tenants: int, cap: int, need: int, fresh: float,
                       node_used: float, stream_fill: float = 0.0) -> float:
    """Packing, per GPU, judged on what it minimises: the number of GPUs with load.

    A GPU already in use always beats a fresh one (>= 50 vs <= 50), and among those the
    fullest after placement wins (best fit), full by whichever resource binds: HBM, or
    the share of the ITL byte budget its tenants stream (``stream_fill``, 0-1). A fresh
    GPU scores up to ``50 x fresh``,
    where ``fresh`` (0-1) is what opening a GPU of this product is worth (see
    ``search.fresh_values``); of equal fresh GPUs, the one on the node with more
    HBM in use (``node_used``, 0-1) wins, which keeps whole nodes free.
    """
    if tenants > 0:
        return 50.0 + 50.0 * max((cap - free + need) / cap, stream_fill)
    return 50.0 * fresh * (0.9 + 0.1 * node_used)


def gpu_kv_headroom(free: int, need: int, max_cap: int, stream_fill: float = 0.0) -> float:
    """HBM left on the GPU after placement (room for this replica's KV to grow and for
    its neighbours), relative to the largest GPU of the fleet, scaled down by the share
    of the ITL byte budget its tenants would stream: spreading."""
    return 100.0 * (free - need) / max_cap * (1.0 - stream_fill)


def stream_fill(s: NodeState, g: int, req: Requirement) -> float:
    """The share of GPU ``g``'s step-byte budget its tenants and this replica would
    stream (0 without an ITL target)."""
    budget = tighter(s.limit(g), req.step_budget)
    if not budget or budget <= 0:
        return 0.0
    return min(1.0, (s.streamed[g] + req.step_bytes) / budget)


def least_allocated(s: NodeState, req: Requirement) -> float:
    """Node-level spreading as kube-scheduler's LeastAllocated: free HBM fraction after."""
    total = s.cap * s.node.gpus
    return 100.0 * (sum(s.free) - req.total) / total


def model_spread(s: NodeState, demand: Demand) -> float:
    """Fewer replicas of the same model on the node is better (failure domains)."""
    return 100.0 / (1 + s.models.get(demand.model, 0))


def score_node(
    s: NodeState, demand: Demand, req: Requirement, weights: dict[str, float],
    max_cap: int, share: bool, fresh: float, apart: Optional[Apart] = None,
) -> tuple[float, tuple[int, ...]]:
    """(score, chosen GPUs) of a node that passed the filters; ``fresh`` is the value of
    opening a fresh GPU on it (see ``gpu_most_allocated``). Fewer GPUs than the TP
    degree (and score 0) where fewer fit (``NodeState.fits``, within the model's spread
    limit per GPU, ``apart``)."""
    need, cap = req.hbm_per_gpu, s.cap
    w_pack, w_head = weights["most_allocated"], weights["kv_headroom"]
    node_used = 1.0 - sum(s.free) / (cap * s.node.gpus)
    ranked = []
    for g, (free, tenants) in enumerate(zip(s.free, s.tenants)):
        if not s.fits(g, req, share, apart):
            continue
        fill = stream_fill(s, g, req)
        pack = gpu_most_allocated(free, tenants, cap, need, fresh, node_used, fill)
        head = gpu_kv_headroom(free, need, max_cap, fill)
        ranked.append((-(w_pack * pack + w_head * head), g, pack, head))
    if len(ranked) < req.tp:
        return 0.0, ()
    ranked.sort()
    chosen = ranked[: req.tp]
    tp = len(chosen)
    total = (
        w_pack * sum(c[2] for c in chosen) / tp
        + w_head * sum(c[3] for c in chosen) / tp
    )
    w_least, w_spread = weights["least_allocated"], weights["model_spread"]
    if w_least:
        total += w_least * least_allocated(s, req)
    if w_spread:
        total += w_spread * model_spread(s, demand)
    weight = w_pack + w_head + w_least + w_spread
    return (total / weight if weight else 0.0), tuple(sorted(c[1] for c in chosen))
