"""``place(snapshot, demands, policy) -> Plan``: the placement decision, as a pure function.

Order: existing replicas first (their HBM is accounted before anything new, and they
stay where they are unless the policy rebalances), then new replicas model by model,
largest first (first-fit decreasing: a large replica placed late finds only fragments).
For each replica, a bounded set of candidate nodes per allowed product (see
``Pool.candidates``) goes through the filters; the feasible ones are scored and the best
wins, ties going to the node that comes first in the snapshot. A replica that finds no
node gets a reason that says what it needs, what the best free set is, and what would
make it fit.

Under pure packing (``Policy.packing == 1``, GPUs shared, no replica spreading) two
steps serve the objective itself, the number of GPUs with load (see ``packing``): a GPU
that a replica opens is completed at once with the pending replicas that fill it best,
and at the end a bounded ruin-and-recreate search moves single-GPU replicas to empty
GPUs. Both only ever choose among placements the filters allow. The plan may also be
made other ways (fresh GPUs valued otherwise, other model orders on small instances) and
the best kept: see ``place``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from kvpilot.api.memory import usable_hbm
from kvpilot.operator.placement.filters import first_failure
from kvpilot.operator.placement.model import (
    Assignment, Demand, Existing, Move, NodeUsage, Plan, Policy, Requirement, Snapshot,
    Unplaced,
)
from kvpilot.operator.placement.packing import best_fill, consolidate
from kvpilot.operator.placement.reasons import explain
from kvpilot.operator.placement.scores import score_node
from kvpilot.operator.placement.state import NodeState, Pool

# Candidate nodes taken from each end of each index: enough that pure packing and pure
# spreading find their best node, few enough that 5,000 replicas on 2,000 nodes plan in
# well under a second.
WINDOW = 3
TIGHT_FIT = 0.95  # a replica that fills this much of a GPU "fits it tightly"
CONSOLIDATE_MOVES = 10_000  # replicas moved, at most, by consolidation
CONSOLIDATE_MOVES_LARGE = 3_000  # the same beyond VARIANT_WORK (planning time at scale)
# Pending replicas x schedulable nodes up to which a plan is also made a second way
# (fresh GPUs valued by how full they end up): small instances, where it costs little.
VARIANT_WORK = 100_000
# On those instances, plans with other model orders (``World.alternative_orders``): at
# most this many, and only while their consolidation has spent fewer replica moves in
# all than this (work, not time: the result does not depend on the machine).
PORTFOLIO_ORDERS = 8
PORTFOLIO_MOVES = 12_000


def place(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy = Policy()) -> Plan:
    """Place every demanded replica that fits; give a reason for each one that does not.

    Under pure packing the plan may be made more than once, each time valuing fresh GPUs
    differently (see ``World.fresh_values``): when the largest GPUs cannot hold the whole
    demand, once sending replicas that fill a smaller GPU tightly there; on a small
    instance, once opening the product whose GPU the replica and the pending replicas
    fill most, and then, in the way that won, with other model orders
    (``World.alternative_orders``) while a budget of consolidation moves lasts. The plan
    that places more, then uses fewer GPUs, wins (ties to the first, so the result is
    still a pure function of the input).
    """
    plan, world = _plan_once(snapshot, demands, policy, "largest")
    variants = []
    if world.fill and world.scarce:
        variants.append("tight")
    if world.fill and world.small:
        variants.append("fill")
    best_mode = "largest"
    for mode in variants:
        other, _ = _plan_once(snapshot, demands, policy, mode)
        if _better(other, plan):
            plan, best_mode = other, mode
    if world.fill and world.small:
        # Other model orders, in the mode that won, while the moves budget lasts.
        left = PORTFOLIO_MOVES
        for order in world.alternative_orders()[:PORTFOLIO_ORDERS]:
            if left <= 0:
                break
            other, alt = _plan_once(snapshot, demands, policy, best_mode, order,
                                    min(CONSOLIDATE_MOVES, left))
            left -= alt.moves
            if _better(other, plan):
                plan = other
    return plan


def _better(a: Plan, b: Plan) -> bool:
    """``a`` places more than ``b``, or as many on fewer GPUs (equal: not better)."""
    return (len(a.unplaced), a.gpus_used) < (len(b.unplaced), b.gpus_used)


def _plan_once(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
               mode: str, order: Optional[list[str]] = None,
               moves: Optional[int] = None) -> tuple[Plan, "World"]:
    world = World(snapshot, demands, policy, mode)
    world.ranking = order
    kept, removals, previous = world.resolve_existing()
    for d in demands:
        world.pending[d.model] = max(0, d.replicas - sum(1 for e in kept if e.model == d.model))
    world.scarce = world.largest_is_scarce()
    world.work = sum(world.pending.values()) * sum(len(p.states) for p in world.pools)
    unplaced: list[Unplaced] = []
    for demand in world.order():
        reason = world.place_demand(demand)
        if reason is not None:
            unplaced.extend(Unplaced("", demand.model, reason)
                            for _ in range(world.pending[demand.model]))
            world.pending[demand.model] = 0
    if world.fill:
        if moves is None:
            moves = CONSOLIDATE_MOVES if world.small else CONSOLIDATE_MOVES_LARGE
        world.moves = consolidate(world, moves)
    return world.plan(kept, removals, previous, world.placed, unplaced), world


class World:
    """One run of placement: the node states copied from the snapshot, the indexes over
    them, what is pending and what has been placed. ``place()`` builds one (or two), the
    exact reference reads the same states so both start from the same world."""

    def __init__(self, snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
                 mode: str = "largest") -> None:
        self.policy = policy
        self.mode = mode  # how fresh GPUs are valued: "largest", "tight" or "fill"
        self.demands = list(demands)
        self.by_model: dict[str, Demand] = {}
        for d in self.demands:
            if d.model in self.by_model:
                raise ValueError(f"model {d.model!r} is demanded twice")
            if d.replicas < 0:
                raise ValueError(f"model {d.model!r}: replicas must be >= 0")
            self.by_model[d.model] = d
        self.states = [
            NodeState(n, i, usable_hbm(n.gpu_hbm, policy.reserve))
            for i, n in enumerate(snapshot.nodes)
        ]
        self.by_name: dict[str, NodeState] = {}
        for s in self.states:
            if s.node.name in self.by_name:
                raise ValueError(f"node {s.node.name!r} appears twice in the snapshot")
            self.by_name[s.node.name] = s
        self.existing = sorted(snapshot.replicas, key=lambda e: _natural(e.name))
        self.taken_names = {e.name for e in self.existing}
        if len(self.taken_names) != len(self.existing):
            raise ValueError("two existing replicas have the same name")
        self.weights = policy.weights()
        self.spread = any(self.weights[k] for k in ("kv_headroom", "least_allocated",
                                                    "model_spread"))
        self.max_cap = max((s.cap for s in self.states if s.node.schedulable), default=1) or 1
        self.ranking: Optional[list[str]] = None  # model order, if not largest first
        self.pools: list[Pool] = []  # built after existing replicas are loaded
        self.scarce = False  # the largest product cannot hold the demand
        self.work = 0  # pending replicas x schedulable nodes
        self.moves = 0  # replica moves consolidation spent
        self.pending: dict[str, int] = {}  # model -> replicas still to place
        self.placed: list[tuple[Demand, NodeState, tuple[int, ...], Requirement]] = []
        # Completing fresh GPUs (see ``_fill``) serves the packing objective alone.
        self.fill = policy.packing == 1.0 and not policy.spread_replicas and policy.share_gpus

    # -- existing replicas -------------------------------------------------------------

    def resolve_existing(self) -> tuple[list[Existing], list[str], list[Existing]]:
        """(kept in place, to remove, previous replicas a rebalance may move)."""
        removals: list[str] = []
        alive: list[Existing] = []
        for e in self.existing:
            s = self.by_name.get(e.node)
            if s is None or not s.node.ready:
                removals.append(e.name)  # lost with its node: placed again as new
                continue
            if len(set(e.gpus)) != len(e.gpus) or any(not 0 <= g < s.node.gpus for g in e.gpus):
                raise ValueError(f"existing replica {e.name!r}: GPUs {list(e.gpus)} are not "
                                 f"distinct indices below {s.node.gpus} on node {e.node!r}")
            alive.append(e)
        previous: list[Existing] = []
        if self.policy.rebalance:
            previous = [e for e in alive if e.model in self.by_model]
            alive = [e for e in alive if e.model not in self.by_model]
        for e in alive:
            self.by_name[e.node].add(e.model, e.gpus, e.hbm_per_gpu)
        kept = list(alive)
        for d in self.demands:
            mine = [e for e in kept if e.model == d.model]
            excess = len(mine) - d.replicas
            if excess <= 0:
                continue
            for e in sorted(mine, key=self._removal_key)[:excess]:
                self.by_name[e.node].remove(e.model, e.gpus, e.hbm_per_gpu)
                kept.remove(e)
                removals.append(e.name)
        self.pools = self._pools()
        return kept, removals, previous

    def _removal_key(self, e: Existing) -> tuple:
        """Which surplus replica goes first: one on a cordoned node (being drained), then
        the one that is alone on the most GPUs (removing it frees whole GPUs), then the
        one on the least loaded node, then the newest name."""
        s = self.by_name[e.node]
        alone = sum(1 for g in e.gpus if s.tenants[g] == 1)
        used = sum(s.cap - f for f in s.free)
        return (not s.node.cordoned, -alone, used, [-x if isinstance(x, int) else x
                                                    for x in _natural(e.name)])

    def _pools(self) -> list[Pool]:
        products = sorted({s.node.product for s in self.states if s.node.schedulable})
        return [
            Pool(p, [s for s in self.states if s.node.schedulable and s.node.product == p],
                 self.policy.share_gpus, self.spread)
            for p in products
        ]

    # -- new replicas ------------------------------------------------------------------

    def order(self) -> list[Demand]:
        """Largest replica first (HBM over all its GPUs, then per GPU), then by name; or
        ``ranking`` (model names) when ``place()`` tries another order."""
        if self.ranking is not None:
            return [self.by_model[m] for m in self.ranking]
        def size(d: Demand) -> tuple[int, int]:
            return max(((r.total, r.hbm_per_gpu) for _, r in self.sized(d)), default=(0, 0))

        return sorted(self.demands, key=lambda d: (tuple(-x for x in size(d)), d.model))

    def alternative_orders(self) -> list[list[str]]:
        """Other model orders worth a plan on a small instance, most promising first, each
        once and none equal to ``order()``: every adjacent pair of the largest-first order
        swapped (front to back), then decreasing HBM per GPU, then, when the largest
        product is scarce, decreasing GPUs saved per GPU of it (``_saved_per_scarce``).
        Largest first decides which replicas get a scarce product by size alone; a model
        that packs three to an H200 GPU and one to an 80 GB GPU may deserve it more than
        a larger one that needs the same GPUs on either. Model names only: deterministic.
        """
        base = [d.model for d in self.order()]
        rank = {m: i for i, m in enumerate(base)}
        seen = {tuple(base)}
        out: list[list[str]] = []

        def add(order: list[str]) -> None:
            if tuple(order) not in seen:
                seen.add(tuple(order))
                out.append(order)

        for i in range(len(base) - 1):
            swapped = list(base)
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            add(swapped)

        def per_gpu(m: str) -> int:
            return max((r.hbm_per_gpu for _, r in self.sized(self.by_model[m])), default=0)

        add(sorted(base, key=lambda m: (-per_gpu(m), rank[m])))
        if self.scarce:
            largest = self.largest_pool()
            add(sorted(base, key=lambda m: (-self._saved_per_scarce(m, largest), rank[m])))
        return out

    def _saved_per_scarce(self, model: str, largest: Pool) -> float:
        """GPUs one replica saves by running on the largest product instead of the
        cheapest other one, per GPU of the largest it takes; a single-GPU replica takes
        1/k of a GPU that holds k of it. -1 where it cannot run on the largest."""
        d = self.by_model[model]
        here_req = d.requirement(largest.product)
        if here_req is None or here_req.tp > largest.max_gpus:
            return -1.0

        def gpus(req: Requirement, cap: int) -> float:
            if req.tp > 1:
                return float(req.tp)
            return 1.0 / max(1, cap // req.hbm_per_gpu)

        here = gpus(here_req, largest.states[0].cap)
        other = [gpus(r, p.states[0].cap) for p, r in self.sized(d)
                 if p is not largest and r.tp <= p.max_gpus]
        return (min(other) - here) / here if other else 0.0

    def place_demand(self, demand: Demand) -> Optional[str]:
        """Place the model's pending replicas one by one; the reason of the first that fits
        nowhere, else None.

        Free HBM only shrinks within a run, so when one replica of a model fits nowhere
        its later replicas do not either: they share its reason.
        """
        options = [(pool, req) for pool, req in self.sized(demand) if req.tp <= pool.max_gpus]
        cache: dict[int, tuple] = {}  # node -> (version, score, gpus, pool, req)
        fresh = self.fresh_values(options)
        while self.pending[demand.model] > 0:
            best: Optional[tuple] = None
            for pool, req in options:
                for idx in pool.candidates(req.tp, req.hbm_per_gpu, WINDOW, self.spread):
                    s = self.states[idx]
                    hit = cache.get(idx)
                    if hit is None or hit[0] != s.version:
                        if first_failure(s, demand, self.policy) is None:
                            score, gpus = score_node(s, demand, req, self.weights, self.max_cap,
                                                     self.policy.share_gpus, fresh[pool.product])
                        else:  # the spreading window may hold nodes that do not fit
                            score, gpus = None, ()
                        hit = cache[idx] = (s.version, score, gpus, pool, req)
                    if hit[1] is None:
                        continue
                    if best is None or hit[1] > best[1] or (hit[1] == best[1] and idx < best[0]):
                        best = (idx, hit[1], hit[2], hit[3], hit[4])
            if best is None:
                return explain(demand, self.states, self.policy)
            idx, _, gpus, pool, req = best
            s = self.states[idx]
            opened = [g for g in gpus if s.tenants[g] == 0]
            self._commit(demand, pool, s, gpus, req)
            if self.fill and opened:
                for g in opened:
                    self._fill(pool, s, g)
        return None

    def _commit(self, demand: Demand, pool: Pool, s: NodeState, gpus: tuple[int, ...],
                req: Requirement) -> None:
        pool.update(s, demand.model, gpus, req.hbm_per_gpu)
        self.placed.append([demand, s, gpus, req])
        self.pending[demand.model] -= 1

    def _fill_items(self, product: str, room: int) -> list[tuple[int, int, Demand, Requirement]]:
        """Pending single-GPU replicas that could share a GPU of ``product``:
        (need, count, demand, requirement), largest first."""
        items = []
        for d in self.demands:
            count = self.pending.get(d.model, 0)
            if count <= 0:
                continue
            req = d.requirement(product)
            if req is not None and req.tp == 1 and req.hbm_per_gpu <= room:
                items.append((req.hbm_per_gpu, count, d, req))
        items.sort(key=lambda x: (-x[0], x[2].model))
        return items

    def _fill(self, pool: Pool, s: NodeState, g: int) -> None:
        """Complete a GPU that a replica has just opened with the pending single-GPU
        replicas that leave the least HBM unused (minimum bin slack, Gupta and Ho).

        Placing largest-first and best-fit alone leaves holes that no later replica
        fits; choosing a GPU's whole content at once avoids most of them.
        """
        items = self._fill_items(pool.product, s.free[g])
        if not items:
            return
        _, counts = best_fill(s.free[g], [(need, count) for need, count, _, _ in items])
        for (need, _, d, req), k in zip(items, counts):
            for _ in range(k):
                self._commit(d, pool, s, (g,), req)

    @property
    def small(self) -> bool:
        """A small instance (``VARIANT_WORK``): plans are also made other ways."""
        return self.work <= VARIANT_WORK

    def sized(self, demand: Demand) -> list[tuple[Pool, Requirement]]:
        """(pool, what one replica needs there) for every product the demand may use."""
        return [(p, r) for p in self.pools if (r := demand.requirement(p.product)) is not None]

    def largest_pool(self) -> Optional[Pool]:
        """The pool of the product with the largest GPUs (ties: by product name)."""
        return max(self.pools, key=lambda p: (p.states[0].cap, p.product), default=None)

    def largest_is_scarce(self) -> bool:
        """Whether the pending demand needs more HBM than the largest product has free."""
        largest = self.largest_pool()
        if largest is None:
            return False
        volume = 0
        for d in self.demands:
            r = d.requirement(largest.product)
            if r is not None:
                volume += r.total * self.pending.get(d.model, 0)
        return volume > sum(f for s in largest.states for f in s.free if f > 0)

    def fresh_values(self, options: list[tuple[Pool, Requirement]]) -> dict[str, float]:
        """Product -> what opening one of its GPUs is worth (0-1).

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
            if self.mode == "fill":
                room = cap - req.hbm_per_gpu
                items = [(need, count) for need, count, _, _ in
                         self._fill_items(pool.product, room)]
                filled = best_fill(room, items)[0] if items else 0
                values[pool.product] = (req.hbm_per_gpu + filled) / cap
                continue
            tight = (self.mode == "tight" and req.tp == fewest
                     and req.hbm_per_gpu >= TIGHT_FIT * cap)
            values[pool.product] = 1.0 if tight else cap / self.max_cap
        return values

    # -- the plan ----------------------------------------------------------------------

    def plan(self, kept: list[Existing], removals: list[str], previous: list[Existing],
             placed: list, unplaced: list[Unplaced]) -> Plan:
        rows: list[tuple[str, str, str, tuple[int, ...], int, int, bool]] = []
        for e in kept:
            rows.append((e.name, e.model, e.node, tuple(e.gpus), e.hbm_per_gpu,
                         self._kv_tokens(e), True))
        moves: list[Move] = []
        avoided = len(kept)
        new_by_model: dict[str, list] = {}
        for d, s, gpus, req in placed:
            new_by_model.setdefault(d.model, []).append(
                (s.node.name, gpus, req.hbm_per_gpu, req.kv_tokens))
        for model in sorted(new_by_model):
            fresh = new_by_model[model]
            old = [e for e in previous if e.model == model]
            # A rebalance keeps the name of a replica whose new place is its old one.
            for e in list(old):
                spot = next((f for f in fresh if f[0] == e.node and f[1] == tuple(e.gpus)), None)
                if spot is not None:
                    fresh.remove(spot)
                    old.remove(e)
                    rows.append((e.name, model, spot[0], spot[1], spot[2], spot[3], True))
                    avoided += 1
            for e, spot in zip(list(old), list(fresh)):
                fresh.remove(spot)
                old.remove(e)
                moves.append(Move(e.name, model, e.node, tuple(e.gpus), spot[0], spot[1]))
                rows.append((e.name, model, spot[0], spot[1], spot[2], spot[3], False))
            removals.extend(e.name for e in old)
            names = self._fresh_names(model, len(fresh))
            for name, spot in zip(names, fresh):
                rows.append((name, model, spot[0], spot[1], spot[2], spot[3], False))
        for e in previous:  # a rebalanced model none of whose replicas could be placed
            if e.model not in new_by_model and e.name not in removals:
                removals.append(e.name)
        unplaced = self._name_unplaced(unplaced)
        final = {s.node.name: s for s in self.states}
        model_rank = {d.model: i for i, d in enumerate(self.demands)}
        rows.sort(key=lambda r: (model_rank.get(r[1], len(model_rank)), r[1], _natural(r[0])))
        assignments = tuple(
            Assignment(name, model, node, gpus, hbm, kv, existing,
                       shared=any(final[node].tenants[g] > 1 for g in gpus))
            for name, model, node, gpus, hbm, kv, existing in rows
        )
        nodes = tuple(
            NodeUsage(s.node.name, s.node.product, s.cap, tuple(s.cap - f for f in s.free),
                      s.node.schedulable)
            for s in self.states
        )
        return Plan(assignments, tuple(unplaced), tuple(removals), tuple(moves), avoided, nodes)

    def _kv_tokens(self, e: Existing) -> int:
        d = self.by_model.get(e.model)
        s = self.by_name[e.node]
        req = d.requirement(s.node.product) if d else None
        return req.kv_tokens if req is not None and req.hbm_per_gpu == e.hbm_per_gpu else 0

    def _fresh_names(self, model: str, count: int) -> list[str]:
        names, i = [], 0
        while len(names) < count:
            name = f"{model}-{i}"
            if name not in self.taken_names:
                names.append(name)
                self.taken_names.add(name)
            i += 1
        return names

    def _name_unplaced(self, unplaced: list[Unplaced]) -> list[Unplaced]:
        out = []
        by_model: dict[str, list[Unplaced]] = {}
        for u in unplaced:
            by_model.setdefault(u.model, []).append(u)
        for model, items in by_model.items():
            names = self._fresh_names(model, len(items))
            out.extend(Unplaced(n, u.model, u.reason) for n, u in zip(names, items))
        return out


def _natural(name: str) -> list:
    """'m-10' after 'm-9': digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
