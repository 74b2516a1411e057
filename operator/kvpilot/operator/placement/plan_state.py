"""The state of one placement run, and the operations every step of it shares.

``place()`` builds a few ``PlanState``s (one per way it makes the plan); the exact
reference builds one too, so both start from the same node states. Every step takes the
state it works on as an argument: the constructive pass (``construct``, ``search``),
the spread limits (``spread``), the packing objective's improvements (``improve``), the
ILP (``ilp``), the model orders (``orders``) and the plan's assembly (``assemble``).
None of them imports ``engine``, which only orchestrates them.

What changes during a run, and who changes it:

- the node states and the pools' indexes (``state.NodeState``, ``state.Pool``): only
  through ``commit`` and ``Pool.update`` / ``Pool.release``, so the indexes stay in
  step with the states;
- ``pending`` and ``placed``: ``commit`` adds a replica; consolidation, repair and
  respread move replicas of ``placed`` (``Placed.state`` is None while one is in hand);
- ``aparts``, ``narrow`` and ``crowded``: the spread limits, raised by ``spread.relax``
  and loosened by ``spread.limits_of``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple, Optional, Sequence

from kvpilot.api.memory import usable_hbm
from kvpilot.operator.placement.existing import Resolved, resolve_existing
from kvpilot.operator.placement.model import Demand, Existing, Policy, Requirement, Snapshot
from kvpilot.operator.placement.state import Apart, NodeState, Placed, Pool, natural

# Pending replicas x schedulable nodes up to which a plan is also made other ways and
# unplaced replicas are repaired: small instances, where it costs little.
VARIANT_WORK = 100_000
FILL_ITEMS = 24  # kinds of pending replica offered to complete one GPU, largest first


class Option(NamedTuple):
    """A product a demand may use: its pool, and what one replica needs there."""

    pool: Pool
    req: Requirement


class FillItem(NamedTuple):
    """Pending single-GPU replicas of one model that could complete a GPU."""

    need: int  # HBM of one
    pending: int  # how many are pending
    demand: Demand
    req: Requirement


class _FillEntry(NamedTuple):
    """A single-GPU requirement in a product's fill index (``PlanState.fill_items``)."""

    demand: Demand
    req: Requirement


def _fill_order(e: _FillEntry) -> tuple[int, bool, int, str]:
    """Largest first; of equal size the one with the loosest ITL budget first (a tight
    one caps the GPU for the rest), none before any; then by model name."""
    r = e.req
    return -r.hbm_per_gpu, r.step_budget is not None, -(r.step_budget or 0), e.demand.model


def _neg_need(e: _FillEntry) -> int:
    return -e.req.hbm_per_gpu


def _validated(demands: Sequence[Demand]) -> dict[str, Demand]:
    by_model: dict[str, Demand] = {}
    for d in demands:
        if d.model in by_model:
            raise ValueError(f"model {d.model!r} is demanded twice")
        if d.replicas < 0:
            raise ValueError(f"model {d.model!r}: replicas must be >= 0")
        by_model[d.model] = d
    return by_model


class PlanState:
    """One run of placement: the node states copied from the snapshot, the indexes over
    them, what is pending and what has been placed, and the spread limits as they stand.

    Built in two steps: the constructor copies the snapshot; ``load_existing`` accounts
    for the replicas that already run and then builds the indexes and what is pending.
    """

    __slots__ = ("policy", "mode", "demands", "by_model", "nodes", "by_name", "existing",
                 "taken_names", "weights", "spread", "max_cap", "optimizes", "pools",
                 "by_product", "scarce", "work", "moves", "pending", "placed", "aparts",
                 "narrow", "crowded", "fill_index", "_sized")

    def __init__(self, snapshot: Snapshot, demands: Sequence[Demand], policy: Policy,
                 mode: str = "largest") -> None:
        self.policy = policy
        # How fresh GPUs are valued: "largest", "tight" or "fill" (``search.fresh_values``).
        self.mode = mode
        self.demands = list(demands)
        self.by_model = _validated(self.demands)  # model -> demand, in demand order
        # One state per node of the snapshot, in its order (``NodeState.index``).
        self.nodes = [NodeState(n, i, usable_hbm(n.gpu_hbm, policy.reserve))
                      for i, n in enumerate(snapshot.nodes)]
        self.by_name: dict[str, NodeState] = {}
        for s in self.nodes:
            if s.node.name in self.by_name:
                raise ValueError(f"node {s.node.name!r} appears twice in the snapshot")
            self.by_name[s.node.name] = s
        self.existing: list[Existing] = sorted(snapshot.replicas, key=lambda e: natural(e.name))
        self.taken_names = {e.name for e in self.existing}  # replica names in use
        if len(self.taken_names) != len(self.existing):
            raise ValueError("two existing replicas have the same name")
        self.weights = policy.weights()
        self.spread = any(self.weights[k] for k in ("kv_headroom", "least_allocated",
                                                    "model_spread"))
        self.max_cap = max((s.cap for s in self.nodes if s.node.schedulable), default=1) or 1
        self.optimizes = policy.optimizes
        self.pools: list[Pool] = []  # by product name; built after existing replicas load
        self.by_product: dict[str, Pool] = {}
        self.scarce = False  # the largest product cannot hold the demand
        self.work = 0  # pending replicas x schedulable nodes
        self.moves = 0  # replica moves consolidation spent
        self.pending: dict[str, int] = {}  # model -> replicas still to place
        self.placed: list[Placed] = []  # replicas this run placed, in order
        # model -> its spread limits now (``Apart``), for models that spread.
        self.aparts: dict[str, Apart] = {
            d.model: Apart.strict(d) for d in self.demands if d.spreads}
        # Spreading models whose replicas go only where they take their fewest GPUs: a
        # spread never raises a replica's tensorParallel while its limit can rise
        # instead (``spread.relax``).
        self.narrow: set[str] = set(self.aparts)
        # model -> why its limits first had to rise (``reasons.crowding``).
        self.crowded: dict[str, str] = {}
        # product -> pending single-GPU requirements, in ``_fill_order``
        self.fill_index: dict[str, list[_FillEntry]] = {}
        self._sized: dict[str, list[Option]] = {}  # model -> ``sized``, once pools exist

    def load_existing(self) -> Resolved:
        """Existing replicas first (``existing.resolve_existing``), then the indexes and
        what is pending."""
        resolved = resolve_existing(self.existing, self.by_name, self.by_model,
                                    self.policy.rebalance)
        kept = resolved.kept
        self.pools = [
            Pool(p, [s for s in self.nodes if s.node.schedulable and s.node.product == p],
                 self.policy.share_gpus, self.spread)
            for p in sorted({s.node.product for s in self.nodes if s.node.schedulable})
        ]
        self.by_product = {p.product: p for p in self.pools}
        for d in self.demands:
            self.pending[d.model] = max(0, d.replicas - sum(1 for e in kept if e.model == d.model))
        self.scarce = self.largest_is_scarce()
        self.work = sum(self.pending.values()) * sum(len(p.states) for p in self.pools)
        for pool in self.pools:
            entries = [_FillEntry(d, req)
                       for d in self.demands if self.pending[d.model] > 0
                       and (req := d.requirement(pool.product)) is not None and req.tp == 1]
            self.fill_index[pool.product] = sorted(entries, key=_fill_order)
        return resolved

    @property
    def small(self) -> bool:
        """A small instance (``VARIANT_WORK``): plans are also made other ways."""
        return self.work <= VARIANT_WORK

    # -- placing -----------------------------------------------------------------------

    def commit(self, demand: Demand, pool: Pool, s: NodeState, gpus: tuple[int, ...],
               req: Requirement) -> None:
        """Place one pending replica of ``demand`` on ``gpus`` of ``s`` (of ``pool``)."""
        pool.update(s, demand.model, gpus, req)
        self.placed.append(Placed(demand, s, gpus, req))
        self.pending[demand.model] -= 1

    def fresh_names(self, model: str, count: int) -> list[str]:
        """``count`` replica names of the model not in use yet (then in use)."""
        names: list[str] = []
        i = 0
        while len(names) < count:
            name = f"{model}-{i}"
            if name not in self.taken_names:
                names.append(name)
                self.taken_names.add(name)
            i += 1
        return names

    # -- where a demand may go ---------------------------------------------------------

    def sized(self, demand: Demand) -> list[Option]:
        """Every product the demand may use, with what one replica needs there (the same
        list on every call once the pools exist: do not change it)."""
        found = self._sized.get(demand.model)
        if found is None:
            found = [Option(p, r) for p in self.pools
                     if (r := demand.requirement(p.product)) is not None]
            if self.pools:
                self._sized[demand.model] = found
        return found

    def options(self, demand: Demand) -> list[Option]:
        """Every product the demand may use and whose nodes are large enough; for a
        spreading model whose limit has not had to reach further (``narrow``), only the
        products where a replica takes its fewest GPUs."""
        options = [o for o in self.sized(demand) if o.req.tp <= o.pool.max_gpus]
        if demand.model in self.narrow and options:
            fewest = min(o.req.tp for o in options)
            options = [o for o in options if o.req.tp == fewest]
        return options

    def fewest_gpus(self, demand: Demand) -> Optional[int]:
        """The fewest GPUs one replica of the demand takes on any product it may use."""
        return min((req.tp for pool, req in self.sized(demand) if req.tp <= pool.max_gpus),
                   default=None)

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

    def fill_items(self, product: str, room: int) -> list[FillItem]:
        """Pending single-GPU replicas that could share a GPU of ``product`` with
        ``room`` free: at most ``FILL_ITEMS`` kinds, largest first, of equal size the
        one with the loosest ITL budget first (a tight one caps the GPU for the rest)."""
        index = self.fill_index.get(product, [])
        items: list[FillItem] = []
        i = bisect_left(index, -room, key=_neg_need)
        while i < len(index) and len(items) < FILL_ITEMS:
            d, req = index[i]
            count = self.pending[d.model]
            if count <= 0:
                del index[i]  # placed in full: pending never grows again in a pass
                continue
            items.append(FillItem(req.hbm_per_gpu, count, d, req))
            i += 1
        return items

    # -- spread limits -----------------------------------------------------------------

    def relaxed(self, model: str) -> bool:
        """Whether the model's spread limit stands above its start."""
        apart = self.aparts.get(model)
        return apart is not None and apart != Apart.strict(self.by_model[model])

    def room(self, demand: Demand, s: NodeState, g: int, count: int) -> int:
        """Of ``count`` replicas of ``demand``, how many GPU ``g`` of ``s`` may take by
        the model's spread limits."""
        apart = self.aparts.get(demand.model)
        if apart is None:
            return count
        return max(0, min(count, apart.gpu_room(s, g), apart.node_room(s)))
