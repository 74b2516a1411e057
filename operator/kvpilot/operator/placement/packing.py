"""How replicas pack onto one node or one GPU: two small searches the constructive pass
and the packing objective's improvements use (``construct``, ``improve``).

``stack_groups``: the replicas of a TP model that go onto one node go there together,
over the fewest GPUs the node can give them: shards of one replica need distinct GPUs,
but two replicas may share any of them, so k replicas of TP t fit a set of GPUs that
hold c_g shards each iff the set has t GPUs and sum min(c_g, k) >= t k (McNaughton's
wrap-around deals them out). Three TP-4 replicas of half a GPU take six GPUs, two
shards on each (staggered), not eight; two TP-8 replicas stack on the same eight GPUs
before anything else tops those GPUs up.

``best_fill``: when a replica opens a GPU, the engine completes it at once with the
pending single-GPU replicas that leave the least HBM unused (minimum bin slack, Gupta
and Ho): placing largest-first and best-fit alone leaves holes no later replica fits.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from kvpilot.operator.placement.model import Requirement
from kvpilot.operator.placement.state import Apart, NodeState

FILL_BUDGET = 400  # search nodes per GPU filled


class Fill(NamedTuple):
    """The best content ``best_fill`` found for one GPU."""

    filled: int  # bytes filled
    counts: list[int]  # how many of each item


def stack_groups(s: NodeState, req: Requirement, count: int, share: bool,
                 apart: Optional[Apart] = None) -> list[tuple[int, ...]]:
    """GPU sets for as many of ``count`` replicas of ``req`` (TP > 1) as node ``s``
    holds, over the fewest fresh GPUs: GPUs in use first, then fresh ones holding the
    most shards, dealt out by McNaughton's wrap-around; within the model's spread
    limits (``apart``). Empty when not one fits."""
    t = req.tp
    caps = [(g, s.shards(g, req, share, apart)) for g in range(s.node.gpus)]
    caps = [(g, c) for g, c in caps if c > 0]
    if len(caps) < t:
        return []
    k = min(count, s.pods_left, sum(c for _, c in caps) // t)
    if apart is not None:
        k = min(k, apart.node_room(s))
    while k > 0 and sum(min(c, k) for _, c in caps) < t * k:
        k -= 1
    if k == 0:
        return []
    ranked = sorted(caps, key=lambda gc: (s.tenants[gc[0]] == 0, -gc[1], gc[0]))
    slots: list[int] = []
    used = 0
    for g, c in ranked:
        if len(slots) >= t * k and used >= t:
            break
        slots.extend([g] * min(c, k))
        used += 1
    slots = slots[: t * k]
    # Slot j of the row goes to replica j mod k: a GPU's (at most k) slots are
    # consecutive, so no replica gets one GPU twice.
    return [tuple(sorted(slots[j::k])) for j in range(k)]


def best_fill(room: int, items: list[tuple[int, int]], budget: int = FILL_BUDGET) -> Fill:
    """The most of ``room`` that copies of ``items`` ((size, count), largest first) can
    fill: (bytes filled, how many of each). A bounded depth-first search: sizes in
    decreasing order, most copies first, pruned when the rest cannot beat the best."""
    n = len(items)
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + items[i][0] * items[i][1]
    best = [0, [0] * n]
    take = [0] * n
    visited = 0

    def search(i: int, left: int, filled: int) -> None:
        nonlocal visited
        if filled > best[0]:
            best[0], best[1] = filled, list(take)
        if i == n or left == 0 or visited >= budget:
            return
        if filled + min(left, suffix[i]) <= best[0]:
            return
        visited += 1
        size, count = items[i]
        for k in range(min(count, left // size), -1, -1):
            take[i] = k
            search(i + 1, left - k * size, filled + k * size)
            if best[0] == room or visited >= budget:
                break
        take[i] = 0

    search(0, room, 0)
    return Fill(best[0], best[1])
