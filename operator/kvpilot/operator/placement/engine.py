"""``place(snapshot, demands, policy) -> Plan``: the placement decision, as a pure function.

Order: existing replicas first (``existing``: their HBM and streamed bytes are accounted
before anything new, and they stay where they are unless the policy rebalances), then
new replicas model by model, largest first (``orders``; first-fit decreasing: a large
replica placed late finds only fragments). For each replica, a bounded set of candidate
nodes per allowed product (see ``Pool.candidates``) goes through the filters; the
feasible ones are scored and the best wins, ties going to the node that comes first in
the snapshot. The candidate windows are drawn from indexes of free HBM alone; when the
bandwidth filter rejects every node in them, every node of the product is looked at, so
"fits nowhere" is always exact. A replica that finds no node gets a reason that says
what it needs, what the best free set is, and what would make it fit.

When the policy optimizes the packing objective (``Policy.optimizes``), the steps that
serve the objective itself, the number of GPUs with load, run too (``packing``): the
replicas of a TP model go onto a node together, stacked and staggered over the fewest
GPUs; a GPU that a replica opens is completed at once with the pending replicas that
fill it best; replicas left unplaced get room made for them by moving others; and at the
end a bounded ruin-and-recreate search moves replicas, TP groups included, to empty GPUs.
All only ever choose among placements the filters allow. The plan may also be made
other ways (fresh GPUs valued otherwise, other model orders on small instances) and the
best kept; on small instances the ILP (``ilp``), started from that plan, improves it
within a work limit: see ``place``.

A model that spreads (``Demand.spread``) is held to its limit (``state.Apart``) by every
one of those steps: a node or GPU at the limit takes none of its replicas. The limit
starts at one replica per node ("node") or GPU ("gpu") and rises, for that model and that
run only, when one of its replicas fits nowhere within it (``World.relax``): so
replicas share a node or GPU only when every one with room holds one already, and then
the least crowded. When the packing steps have since made room on a less crowded node or
GPU, ``World.respread`` moves the replicas of this run there, last.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Optional, Sequence

from kvpilot.api.memory import usable_hbm
from kvpilot.operator.placement.assemble import assemble
from kvpilot.operator.placement.existing import resolve_existing
from kvpilot.operator.placement.filters import BEFORE_SCORING, first_failure, spread_allows
from kvpilot.operator.placement.ilp import solve_world
from kvpilot.operator.placement.model import Demand, Plan, Policy, Requirement, Snapshot, Unplaced
from kvpilot.operator.placement.orders import alternative_orders, largest_first
from kvpilot.operator.placement.packing import best_fill, consolidate, repair, stack_groups
from kvpilot.operator.placement.reasons import crowding, crowding_tally, explain
from kvpilot.operator.placement.scores import score_node
from kvpilot.operator.placement.state import NO_LIMIT, Apart, NodeState, Placed, Pool, natural

# Candidate nodes taken from each end of each index: enough that pure packing and pure
# spreading find their best node, few enough that 5,000 replicas on 2,000 nodes plan in
# well under a second.
WINDOW = 3
TIGHT_FIT = 0.95  # a replica that fills this much of a GPU "fits it tightly"
CONSOLIDATE_MOVES = 10_000  # replicas moved, at most, by consolidation
CONSOLIDATE_MOVES_LARGE = 1_000  # the same beyond VARIANT_WORK (planning time at scale)
# Pending replicas x schedulable nodes up to which a plan is also made other ways and
# unplaced replicas are repaired: small instances, where it costs little.
VARIANT_WORK = 100_000
# On those instances, plans with other model orders (``orders.alternative_orders``): at
# most this many, and only while their consolidation has spent fewer replica moves in
# all than this (work, not time: the result does not depend on the machine).
PORTFOLIO_ORDERS = 8
PORTFOLIO_MOVES = 12_000
# Last, on small instances, the ILP (``ilp``), started from the best plan so far, within
# this much work (branch-and-bound nodes x variables: the plan stays a pure function of
# the input), and not beyond this many pending replicas or variables, where its nodes
# take seconds each. When that plan leaves replicas unplaced, one more placed is worth a
# larger solve (the _INCOMPLETE limits). EXACT_SECONDS only guards the operator's loop
# against a solve far slower than on the benchmark's machine; a plan it cuts short is
# dropped.
EXACT_WORK = 200_000
EXACT_VARIABLES = 2_000
EXACT_WORK_INCOMPLETE = 1_000_000
EXACT_VARIABLES_INCOMPLETE = 4_000
EXACT_REPLICAS = 300
EXACT_SECONDS = 60.0
FILL_ITEMS = 24  # kinds of pending replica offered to complete one GPU, largest first
RESPREAD_MOVES = 4  # moves per replica of a crowded model, at most, to spread it again

__all__ = ["World", "place", "natural"]


def place(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy = Policy()) -> Plan:
    """Place every demanded replica that fits; give a reason for each one that does not.

    When the policy optimizes, the plan may be made more than once, each time valuing
    fresh GPUs differently (see ``World.fresh_values``): when the largest GPUs cannot
    hold the whole demand, once sending replicas that fill a smaller GPU tightly there;
    on a small instance, once opening the product whose GPU the replica and the pending
    replicas fill most, and then, in the way that won, with other model orders while a
    budget of consolidation moves lasts; last, the ILP started from the best of those
    (``_plan_exact``). The plan that places more, then uses fewer GPUs, wins (ties to
    the first, so the result is still a pure function of the input).
    """
    plan, world = _plan_once(snapshot, demands, policy, "largest")
    if not world.optimizes:
        return plan
    variants = []
    if world.scarce:
        variants.append("tight")
    if world.small:
        variants.append("fill")
    best_mode = "largest"
    for mode in variants:
        other, _ = _plan_once(snapshot, demands, policy, mode)
        if _better(other, plan):
            plan, best_mode = other, mode
    if world.small:
        left = PORTFOLIO_MOVES
        for order in alternative_orders(world, not plan.complete)[:PORTFOLIO_ORDERS]:
            if left <= 0:
                break
            other, alt = _plan_once(snapshot, demands, policy, best_mode, order,
                                    min(CONSOLIDATE_MOVES, left))
            left -= alt.moves
            if _better(other, plan):
                plan = other
        exact = _plan_exact(snapshot, demands, policy, plan)
        if exact is not None and _better(exact, plan):
            plan = exact
    return plan


def _plan_exact(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
                start: Plan) -> Optional[Plan]:
    """The plan of the ILP (``ilp``) started from ``start``'s new replicas, within
    ``EXACT_WORK`` (``EXACT_WORK_INCOMPLETE`` when ``start`` leaves replicas unplaced),
    completed by the constructive pass and consolidation; None when more than
    ``EXACT_REPLICAS`` are pending or the model has more variables than allowed, or the
    solver found no plan or ran into the ``EXACT_SECONDS`` guard (a plan that depends on
    the clock is not kept)."""
    world = World(snapshot, demands, policy)
    kept, removals, previous = world.load_existing()
    if not 0 < sum(world.pending.values()) <= EXACT_REPLICAS:
        return None
    world.limits_of(start)
    begun = [(world.by_model[a.model], world.by_name[a.node], a.gpus)
             for a in start.assignments if not a.existing]
    work, variables = ((EXACT_WORK, EXACT_VARIABLES) if start.complete
                       else (EXACT_WORK_INCOMPLETE, EXACT_VARIABLES_INCOMPLETE))
    solution = solve_world(world, dict(world.pending), time_limit=EXACT_SECONDS,
                           work=work, start=begun, max_variables=variables)
    if solution.status in ("none", "too large", "time limit"):
        return None
    pools = {p.product: p for p in world.pools}
    for demand, s, gpus, req in solution.new:
        world.commit(demand, pools[s.node.product], s, gpus, req)
    # Short of the optimum, the solver's plan may leave room that the constructive pass
    # and consolidation still use.
    for demand in largest_first(world):
        if world.pending[demand.model] > 0:
            world.place_demand(demand)
    world.moves = consolidate(world, CONSOLIDATE_MOVES)
    world.respread()
    return assemble(world, kept, removals, previous, world.placed, _unplaced(world, policy))


def _unplaced(world: "World", policy: Policy) -> list[Unplaced]:
    """An entry per replica still pending. Free HBM only shrinks and streamed bytes only
    grow: the reason holds for every replica of the model that is left, said once, on
    the final state."""
    unplaced: list[Unplaced] = []
    for demand in largest_first(world):
        count = world.pending[demand.model]
        if count > 0:
            reason = explain(demand, world.states, policy)
            unplaced.extend(Unplaced("", demand.model, reason) for _ in range(count))
    return unplaced


def _better(a: Plan, b: Plan) -> bool:
    """``a`` places more than ``b``, or as many on fewer GPUs (equal: not better)."""
    return (len(a.unplaced), a.gpus_used) < (len(b.unplaced), b.gpus_used)


def _plan_once(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
               mode: str, order: Optional[list[str]] = None,
               moves: Optional[int] = None) -> tuple[Plan, "World"]:
    world = World(snapshot, demands, policy, mode)
    kept, removals, previous = world.load_existing()
    ranked = (largest_first(world) if order is None
              else [world.by_model[m] for m in order])
    for demand in ranked:
        world.place_demand(demand)
    if world.optimizes and world.small:
        repair(world, [d for d in ranked if world.pending[d.model] > 0])
    if world.optimizes:
        if moves is None:
            moves = CONSOLIDATE_MOVES if world.small else CONSOLIDATE_MOVES_LARGE
        world.moves = consolidate(world, moves)
    world.respread()
    unplaced = _unplaced(world, policy)
    return assemble(world, kept, removals, previous, world.placed, unplaced), world


def _validated(demands: Sequence[Demand]) -> dict[str, Demand]:
    by_model: dict[str, Demand] = {}
    for d in demands:
        if d.model in by_model:
            raise ValueError(f"model {d.model!r} is demanded twice")
        if d.replicas < 0:
            raise ValueError(f"model {d.model!r}: replicas must be >= 0")
        by_model[d.model] = d
    return by_model


class World:
    """One run of placement: the node states copied from the snapshot, the indexes over
    them, what is pending and what has been placed. ``place()`` builds a few; the exact
    reference reads the same states, so both start from the same world."""

    def __init__(self, snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
                 mode: str = "largest") -> None:
        self.policy = policy
        self.mode = mode  # how fresh GPUs are valued: "largest", "tight" or "fill"
        self.demands = list(demands)
        self.by_model = _validated(self.demands)
        self.states = [NodeState(n, i, usable_hbm(n.gpu_hbm, policy.reserve))
                       for i, n in enumerate(snapshot.nodes)]
        self.by_name: dict[str, NodeState] = {}
        for s in self.states:
            if s.node.name in self.by_name:
                raise ValueError(f"node {s.node.name!r} appears twice in the snapshot")
            self.by_name[s.node.name] = s
        self.existing = sorted(snapshot.replicas, key=lambda e: natural(e.name))
        self.taken_names = {e.name for e in self.existing}
        if len(self.taken_names) != len(self.existing):
            raise ValueError("two existing replicas have the same name")
        self.weights = policy.weights()
        self.spread = any(self.weights[k] for k in ("kv_headroom", "least_allocated",
                                                    "model_spread"))
        self.max_cap = max((s.cap for s in self.states if s.node.schedulable), default=1) or 1
        self.optimizes = policy.optimizes
        self.pools: list[Pool] = []  # built after existing replicas are loaded
        self.scarce = False  # the largest product cannot hold the demand
        self.work = 0  # pending replicas x schedulable nodes
        self.moves = 0  # replica moves consolidation spent
        self.pending: dict[str, int] = {}  # model -> replicas still to place
        self.placed: list[Placed] = []
        # model -> its spread limits now (``Apart``), for models that spread; and why a
        # model's limits first had to rise (``reasons.crowding``).
        self.aparts: dict[str, Apart] = {
            d.model: Apart.strict(d) for d in self.demands if d.spreads}
        # Spreading models whose replicas go only where they take their fewest GPUs: a
        # spread never raises a replica's tensorParallel while its limit can rise
        # instead (``relax``).
        self.narrow: set[str] = set(self.aparts)
        self.crowded: dict[str, str] = {}
        # product -> single-GPU requirements, largest first (see ``fill_items``)
        self.fill_index: dict[str, list[tuple]] = {}

    def load_existing(self):
        """Existing replicas first (``existing.resolve_existing``), then the indexes and
        what is pending."""
        kept, removals, previous = resolve_existing(self)
        self.pools = [
            Pool(p, [s for s in self.states if s.node.schedulable and s.node.product == p],
                 self.policy.share_gpus, self.spread)
            for p in sorted({s.node.product for s in self.states if s.node.schedulable})
        ]
        for d in self.demands:
            self.pending[d.model] = max(0, d.replicas - sum(1 for e in kept if e.model == d.model))
        self.scarce = self.largest_is_scarce()
        self.work = sum(self.pending.values()) * sum(len(p.states) for p in self.pools)
        for pool in self.pools:
            items = [(-req.hbm_per_gpu, req.step_budget is not None, -(req.step_budget or 0),
                      d.model, d, req)
                     for d in self.demands if self.pending[d.model] > 0
                     and (req := d.requirement(pool.product)) is not None and req.tp == 1]
            self.fill_index[pool.product] = sorted(items, key=lambda x: x[:4])
        return kept, removals, previous

    # -- new replicas ------------------------------------------------------------------

    def options(self, demand: Demand) -> list[tuple[Pool, Requirement]]:
        """(pool, requirement) of every product the demand may use and whose nodes are
        large enough; for a spreading model whose limit has not had to reach further
        (``narrow``), only the products where a replica takes its fewest GPUs."""
        options = [(pool, req) for pool, req in self.sized(demand)
                   if req.tp <= pool.max_gpus]
        if demand.model in self.narrow and options:
            fewest = min(req.tp for _, req in options)
            options = [(pool, req) for pool, req in options if req.tp == fewest]
        return options

    def fewest_gpus(self, demand: Demand) -> Optional[int]:
        """The fewest GPUs one replica of the demand takes on any product it may use."""
        return min((req.tp for pool, req in self.sized(demand) if req.tp <= pool.max_gpus),
                   default=None)

    def place_demand(self, demand: Demand) -> bool:
        """Place the model's pending replicas; False when one fits nowhere (it and the
        rest stay pending: free HBM only shrinks, so none of them would fit either)."""
        options = self.options(demand)
        cache: dict[int, tuple] = {}  # node -> (version, score, gpus, pool, req)
        fresh = self.fresh_values(options)
        share = self.policy.share_gpus
        while self.pending[demand.model] > 0:
            best = self.best_node(demand, options, fresh, cache)
            if best is None:
                if not self.relax(demand):
                    return False
                cache.clear()  # scores were of the limits before
                options = self.options(demand)
                fresh = self.fresh_values(options)
                continue
            s, gpus, pool, req = best
            sets = [gpus]
            # Several replicas on one node, sharing GPUs: not for a model that spreads.
            if (self.optimizes and req.tp > 1 and self.pending[demand.model] > 1
                    and not demand.spreads):
                sets = stack_groups(s, req, self.pending[demand.model], share) or sets
            opened = sorted({g for group in sets for g in group if s.tenants[g] == 0})
            for group in sets:
                self.commit(demand, pool, s, group, req)
            if self.optimizes:
                for g in opened:
                    self._fill(pool, s, g)
        return True

    def best_node(self, demand: Demand, options: list[tuple[Pool, Requirement]],
                  fresh: dict[str, float], cache: Optional[dict] = None,
                  apart: Optional[Apart] = None,
                  ) -> Optional[tuple[NodeState, tuple[int, ...], Pool, Requirement]]:
        """(node, GPUs, pool, requirement) of the best feasible node for one replica, or
        None when none fits: the candidate windows first, every node when none of
        them passes the filters. A model that spreads is held to its limits now, or to
        ``apart`` when given."""
        cache = {} if cache is None else cache
        best: Optional[tuple] = None
        if apart is None:
            apart = self.aparts.get(demand.model)

        def consider(idx: int, pool: Pool, req: Requirement) -> None:
            nonlocal best
            s = self.states[idx]
            hit = cache.get(idx)
            if hit is None or hit[0] != s.version:
                score, gpus = None, ()  # the spreading window may hold nodes that do not fit
                if (spread_allows(s, apart) is None  # the cheapest, and often the one
                        and first_failure(s, demand, self.policy, BEFORE_SCORING) is None):
                    score, gpus = score_node(s, demand, req, self.weights, self.max_cap,
                                             self.policy.share_gpus, fresh.get(pool.product, 1.0),
                                             apart)
                    if len(gpus) < req.tp:
                        score, gpus = None, ()
                hit = cache[idx] = (s.version, score, gpus, pool, req)
            if hit[1] is None:
                return
            if best is None or hit[1] > best[1] or (hit[1] == best[1] and idx < best[0]):
                best = (idx, hit[1], hit[2], hit[3], hit[4])

        for pool, req in options:
            for idx in pool.candidates(req.tp, req.hbm_per_gpu, WINDOW, self.spread, apart):
                consider(idx, pool, req)
        if best is None:
            for pool, req in options:
                for idx in pool.fitting_nodes(req.tp, req.hbm_per_gpu):
                    consider(idx, pool, req)
        if best is None:
            return None
        idx, _, gpus, pool, req = best
        return self.states[idx], gpus, pool, req

    # -- spread ------------------------------------------------------------------------

    def relax(self, demand: Demand) -> bool:
        """Let a spreading model reach further because one of its replicas fits nowhere
        within its limit: raise the limit by one replica per node ("node") or per GPU
        ("gpu") while it binds; once it does not (the products where a replica takes its
        fewest GPUs are full), let its replicas take more GPUs on other products. False
        when nothing is left to relax (it fits nowhere at all). Only this model, in this
        run, reaches further; the reason is kept from the first time
        (``reasons.crowding``).

        Sharing a node comes before a larger tensorParallel: a replica that needs one
        H200 shares a node with another rather than take four L4s.
        """
        apart = self.aparts.get(demand.model)
        if apart is None:
            return False
        model = demand.model
        most_node = max((s.models.get(model, 0) for s in self.states), default=0)
        most_gpu = max((c.get(model, 0) for s in self.states for c in s.on_gpu), default=0)
        if apart.node_cap is not None and apart.node_cap <= most_node:
            raised = Apart(model, apart.node_cap + 1, apart.gpu_cap)
        elif apart.gpu_cap <= most_gpu:
            raised = Apart(model, apart.node_cap, apart.gpu_cap + 1)
        elif model in self.narrow:
            self.narrow.discard(model)
            return True
        else:
            return False
        if model not in self.crowded:
            self.crowded[model] = crowding(demand, self.states, self.policy, apart,
                                           self.fewest_gpus(demand))
        self.aparts[model] = raised
        return True

    def limits_of(self, plan: Plan) -> None:
        """The spread limits for a run that improves on ``plan`` (the ILP's): a model
        that plan crowds gets none; when the plan leaves replicas unplaced, no model
        gets any (one model kept apart may be what leaves no room for another's replica:
        a replica placed is worth more than replicas apart); else a model keeps its
        limits of one. ``respread`` spreads what the run crowds where there is room,
        last."""
        loose = {c.model for c in plan.crowded}
        if plan.unplaced:
            loose = set(self.aparts)
        for model in loose & set(self.aparts):
            self.aparts[model] = Apart(model, None, NO_LIMIT)
            self.narrow.discard(model)
        # A model the plan placed beyond its fewest GPUs reached further already.
        for a in plan.assignments:
            if a.model in self.narrow and a.tp > (self.fewest_gpus(self.by_model[a.model]) or 0):
                self.narrow.discard(a.model)
        self.crowded.update({c.model: c.reason for c in plan.crowded})

    def relaxed(self, model: str) -> bool:
        """Whether the model's spread limit stands above its start."""
        apart = self.aparts.get(model)
        return apart is not None and apart != Apart.strict(self.by_model[model])

    def respread(self) -> int:
        """Move this run's replicas of a model whose limit had to rise to a less
        crowded node ("node") or GPU ("gpu") where one has room now: consolidation,
        repair and the ILP move other replicas away and may leave such room. A replica
        on a node (GPU) with c replicas of its model goes to one with at most c - 2 (so
        c - 1 there after), where it takes no more GPUs. At most ``RESPREAD_MOVES``
        moves per replica. Returns the replicas moved."""
        moved = 0
        for demand in self.demands:
            apart = self.aparts.get(demand.model)
            if apart is None or not self.relaxed(demand.model):
                continue
            budget = RESPREAD_MOVES * self.by_model[demand.model].replicas
            for level in ["node" if demand.apart_nodes else "gpu"]:
                changed = True
                while changed and budget > 0:
                    changed = False
                    mine = [p for p in self.placed if p.demand is demand and p.state is not None]
                    mine.sort(key=lambda p: (-self._crowding(p, level), p.state.index, p.gpus))
                    for p in mine:
                        c = self._crowding(p, level)
                        if c < 2:
                            break
                        if level == "node":
                            limit = Apart(demand.model, c - 1, NO_LIMIT)
                        else:
                            limit = Apart(demand.model, None, c - 1)
                        if self._move(p, limit):
                            moved += 1
                            budget -= 1
                            changed = True
                            break
        return moved

    def crowd_reason(self, demand: Demand) -> Optional[str]:
        """Why the model's replicas share a node or GPU after this run: why this run had
        to crowd them; else, asked of the final state, that no node or GPU without one
        has room (the same words as when they were placed, so the reason holds still
        from one run to the next), or None when one has (they ran so before)."""
        if demand.model in self.crowded:
            return self.crowded[demand.model]
        strict, fewest = Apart.strict(demand), self.fewest_gpus(demand)
        if crowding_tally(demand, self.states, self.policy, strict, fewest)["fits"]:
            return None
        return crowding(demand, self.states, self.policy, strict, fewest)

    def _crowding(self, p: Placed, level: str) -> int:
        """Replicas of p's model on p's node ("node"), or on its most crowded GPU."""
        s, model = p.state, p.demand.model
        if level == "node":
            return s.models.get(model, 0)
        return max(s.on_gpu[g].get(model, 0) for g in p.gpus)

    def _move(self, p: Placed, limit: Apart) -> bool:
        """Move ``p`` to the best node within ``limit`` where it takes no more GPUs than
        now (spreading never raises a tensorParallel), or leave it where it is."""
        pools = {pool.product: pool for pool in self.pools}
        s, gpus, req = p.state, p.gpus, p.req
        pools[s.node.product].release(s, p.demand.model, gpus, req)
        options = [(pool, r) for pool, r in self.options(p.demand) if r.tp <= req.tp]
        found = self.best_node(p.demand, options, self.fresh_values(options), apart=limit)
        if found is None:
            pools[s.node.product].update(s, p.demand.model, gpus, req)
            return False
        t, gpus_t, pool_t, req_t = found
        pool_t.update(t, p.demand.model, gpus_t, req_t)
        p.state, p.gpus, p.req = t, gpus_t, req_t
        return True

    def commit(self, demand: Demand, pool: Pool, s: NodeState, gpus: tuple[int, ...],
               req: Requirement) -> None:
        pool.update(s, demand.model, gpus, req)
        self.placed.append(Placed(demand, s, gpus, req))
        self.pending[demand.model] -= 1

    def fill_items(self, product: str, room: int
                   ) -> list[tuple[int, int, Demand, Requirement]]:
        """Pending single-GPU replicas that could share a GPU of ``product``:
        (need, count, demand, requirement), largest first, of equal size the one with
        the loosest ITL budget first (a tight one caps the GPU for the rest)."""
        index = self.fill_index.get(product, [])
        items = []
        i = bisect_left(index, (-room,))
        while i < len(index) and len(items) < FILL_ITEMS:
            *_, d, req = index[i]
            count = self.pending[d.model]
            if count <= 0:
                del index[i]  # placed in full: pending never grows again in a pass
                continue
            items.append((req.hbm_per_gpu, count, d, req))
            i += 1
        return items

    def _fill(self, pool: Pool, s: NodeState, g: int) -> None:
        """Complete a GPU that a replica has just opened with the pending single-GPU
        replicas that leave the least HBM unused (minimum bin slack, Gupta and Ho).

        Placing largest-first and best-fit alone leaves holes that no later replica
        fits; choosing a GPU's whole content at once avoids most of them. The choice is
        made on HBM; a replica the bandwidth filter then refuses is left pending.
        """
        items = self.fill_items(pool.product, s.free[g])
        if not items:
            return
        counts = [self._room(d, s, g, count) for _, count, d, _ in items]
        _, counts = best_fill(s.free[g], [(need, count) for (need, _, _, _), count
                                          in zip(items, counts)])
        for (need, _, d, req), k in zip(items, counts):
            apart = self.aparts.get(d.model)
            for _ in range(k):
                if not s.fits(g, req, self.policy.share_gpus, apart) or spread_allows(
                        s, apart) is not None:
                    break
                self.commit(d, pool, s, (g,), req)

    def _room(self, demand: Demand, s: NodeState, g: int, count: int) -> int:
        """Of ``count`` replicas of ``demand``, how many GPU ``g`` of ``s`` may take by
        the model's spread limits."""
        apart = self.aparts.get(demand.model)
        if apart is None:
            return count
        return max(0, min(count, apart.gpu_room(s, g), apart.node_room(s)))

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
                items = [(need, count) for need, count, _, _ in self.fill_items(pool.product, room)]
                filled = best_fill(room, items)[0] if items else 0
                values[pool.product] = (req.hbm_per_gpu + filled) / cap
                continue
            tight = (self.mode == "tight" and req.tp == fewest
                     and req.hbm_per_gpu >= TIGHT_FIT * cap)
            values[pool.product] = 1.0 if tight else cap / self.max_cap
        return values

    def fresh_names(self, model: str, count: int) -> list[str]:
        names, i = [], 0
        while len(names) < count:
            name = f"{model}-{i}"
            if name not in self.taken_names:
                names.append(name)
                self.taken_names.add(name)
            i += 1
        return names
