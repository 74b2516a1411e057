"""The best node for one replica, and what opening a fresh GPU of each product is worth.

``best_node`` is the filter-then-score step of the constructive pass: a bounded set of
candidate nodes per allowed product (see ``Pool.candidates``) goes through the filters;
the feasible ones are scored and the best wins, ties going to the node that comes first
in the snapshot. The candidate windows are drawn from indexes of free HBM alone; when
the bandwidth filter rejects every node in them, every node of the product is looked
at, so "fits nowhere" is always exact. Consolidation, repair and respread ask it too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from kvpilot.operator.placement.filters import BEFORE_SCORING, first_failure, spread_allows
from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.packing import best_fill
from kvpilot.operator.placement.plan_state import Option, PlanState
from kvpilot.operator.placement.scores import score_node
from kvpilot.operator.placement.state import Apart, NodeState, Pool

# Candidate nodes taken from each end of each index: enough that pure packing and pure
# spreading find their best node, few enough that 5,000 replicas on 2,000 nodes plan in
# well under a second.
WINDOW = 3
TIGHT_FIT = 0.95  # a replica that fills this much of a GPU "fits it tightly"


class Found(NamedTuple):
    """Where one replica goes: a node, its GPUs there, the node's pool, and what the
    replica needs on that product."""

    node: NodeState
    gpus: tuple[int, ...]
    pool: Pool
    req: Requirement


class Scored(NamedTuple):
    """A node's score for one replica, kept while the node is unchanged (``version``);
    ``score`` None: it does not fit."""

    version: int
    score: Optional[float]
    gpus: tuple[int, ...]
    pool: Pool
    req: Requirement


# node index -> its score for the replicas of one model (``best_node``'s ``cache``)
ScoreCache = dict[int, Scored]
# ``Scored`` made without the keyword-argument wrapper of its constructor: the scoring
# loop makes one per node it looks at, hundreds of thousands per plan at fleet scale.
_new = tuple.__new__


def best_node(state: PlanState, demand: Demand, options: list[Option],
              fresh: dict[str, float], cache: Optional[ScoreCache] = None,
              apart: Optional[Apart] = None) -> Optional[Found]:
    """The best feasible node for one replica, or None when none fits: the candidate
    windows first, every node when none of them passes the filters. A model that
    spreads is held to its limits now, or to ``apart`` when given. ``cache`` keeps the
    scores of unchanged nodes for the next replica of the same model and options."""
    cache = {} if cache is None else cache
    best: Optional[Scored] = None
    best_idx, best_score = -1, 0.0
    if apart is None:
        apart = state.aparts.get(demand.model)
    nodes, policy, weights, max_cap = state.nodes, state.policy, state.weights, state.max_cap

    def consider(idx: int, pool: Pool, req: Requirement) -> None:
        nonlocal best, best_idx, best_score
        s = nodes[idx]
        hit = cache.get(idx)
        if hit is None or hit.version != s.version:
            # the spreading window may hold nodes that do not fit
            score: Optional[float] = None
            gpus: tuple[int, ...] = ()
            if (spread_allows(s, apart) is None  # the cheapest, and often the one
                    and first_failure(s, demand, policy, BEFORE_SCORING) is None):
                score, gpus = score_node(s, demand, req, weights, max_cap,
                                         policy.share_gpus, fresh.get(pool.product, 1.0),
                                         apart)
                if len(gpus) < req.tp:
                    score, gpus = None, ()
            hit = cache[idx] = _new(Scored, (s.version, score, gpus, pool, req))
        score = hit.score
        if score is None:
            return
        if best is None or score > best_score or (score == best_score and idx < best_idx):
            best, best_idx, best_score = hit, idx, score

    for pool, req in options:
        for idx in pool.candidates(req.tp, req.hbm_per_gpu, WINDOW, state.spread, apart):
            consider(idx, pool, req)
    if best is None:
        for pool, req in options:
            for idx in pool.fitting_nodes(req.tp, req.hbm_per_gpu):
                consider(idx, pool, req)
    if best is None:
        return None
    return Found(nodes[best_idx], best.gpus, best.pool, best.req)


def fresh_values(state: PlanState, options: list[Option]) -> dict[str, float]:
    """Product -> what opening one of its GPUs is worth (0-1), by ``state.mode``.

    ``largest``: its HBM relative to the largest GPU. Every GPU counts one, and a
    replica that fits a small GPU fits a large one, so the largest fresh GPU is the
    one that will hold the most of what follows.
    ``tight``: a product the replica fills to ``TIGHT_FIT`` at the fewest GPUs any
    product needs is worth most: a replica taking 98% of an H100 goes there instead
    of leaving 40% of a scarce H200 to fragments.
    ``fill``: how full the replica's GPU ends up once completed with the pending
    single-GPU replicas (``best_fill``): a 64.5 GiB shard at TP 2 on an 80 GB GPU
    with a 15 GiB replica beside it wastes less than 127 GiB at TP 1 on an H200 that
    nothing pending fills up.
    """
    fewest = min((r.tp for _, r in options), default=1)
    values = {}
    for pool, req in options:
        cap = pool.states[0].cap
        if state.mode == "fill":
            room = cap - req.hbm_per_gpu
            items = [(it.need, it.pending) for it in state.fill_items(pool.product, room)]
            filled = best_fill(room, items)[0] if items else 0
            values[pool.product] = (req.hbm_per_gpu + filled) / cap
            continue
        tight = (state.mode == "tight" and req.tp == fewest
                 and req.hbm_per_gpu >= TIGHT_FIT * cap)
        values[pool.product] = 1.0 if tight else cap / state.max_cap
    return values
