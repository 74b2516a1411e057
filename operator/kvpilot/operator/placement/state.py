"""Mutable per-node state while one plan is being built, the one fit predicate, and the
indexes over the nodes.

``place()`` copies the snapshot into these structures and mutates only the copy. A GPU
has two resources: HBM, and the bytes its tenants stream per decode step, which must
stay within the byte budget of the tightest ITL target among them. Within one
constructive pass free HBM only shrinks and streamed bytes only grow, which two
shortcuts rely on: once a model's replica finds no node, none of its later replicas will
(so the reason is computed once), and a node's score stays valid until that node changes
(``version``).

``gpu_fits`` is THE fit predicate: the filters, the reasons, the packing steps and the
exact reference all ask it (the indexes hold free HBM only, a necessary condition, and
every node they propose still goes through it).
"""

from __future__ import annotations

import re
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

from kvpilot.operator.placement.model import Demand, Existing, Node, Requirement


def tighter(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """The smaller of two step-byte budgets, None meaning no limit."""
    if a is None:
        return b
    return a if b is None or a <= b else b


def gpu_fits(free: int, tenants: int, streamed: int, limit: Optional[int],
             req: Requirement, share: bool) -> bool:
    """Whether one shard of ``req`` fits a GPU with ``free`` HBM, ``tenants`` replicas
    streaming ``streamed`` bytes per step under the budget ``limit`` (theirs; None: no
    target): its HBM fits, sharing allows it, and the bytes of all tenants, its own
    included, stay within the tightest budget among them and it."""
    if free < req.hbm_per_gpu or (tenants and not share):
        return False
    budget = tighter(limit, req.step_budget)
    return budget is None or streamed + req.step_bytes <= budget


NO_LIMIT = 1 << 30  # replicas of a model on one GPU: no limit


@dataclass(frozen=True, slots=True)
class Apart:
    """A spread model's limits as they stand in one run: a node that holds ``node_cap``
    replicas of ``model`` takes no more of them (None: no limit), nor does a GPU that
    holds ``gpu_cap``. They start at one per node ("node") or per GPU ("gpu"), the other
    without limit (``NO_LIMIT``), and rise only when nothing fits within them
    (``spread.relax``)."""

    model: str
    node_cap: Optional[int]
    gpu_cap: int

    @classmethod
    def strict(cls, demand: Demand) -> "Apart":
        """The limits a spreading demand starts with: one replica per node or GPU."""
        if demand.apart_nodes:
            return cls(demand.model, 1, NO_LIMIT)
        return cls(demand.model, None, 1)

    def node_allows(self, s: "NodeState") -> bool:
        return self.node_cap is None or s.models.get(self.model, 0) < self.node_cap

    def gpu_room(self, s: "NodeState", g: int) -> int:
        """Replicas of the model GPU ``g`` may still take (shards of them)."""
        return self.gpu_cap - s.on_gpu[g].get(self.model, 0)

    def node_room(self, s: "NodeState") -> int:
        """Replicas of the model node ``s`` may still take."""
        if self.node_cap is None:
            return 1 << 30
        return self.node_cap - s.models.get(self.model, 0)


def natural(name: str) -> list:
    """'m-10' after 'm-9': digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Load(NamedTuple):
    """What a replica streams on each of its GPUs, and the budget it holds them to."""

    step_bytes: int  # bytes per decode step
    step_budget: Optional[int]  # its ITL byte budget; None: no target


def existing_load(e: Existing, demand: Optional[Demand], product: str) -> Load:
    """The load of a replica that already runs: its bytes per decode step as stated,
    else as its model's requirement on that product says (never more than it holds),
    else everything it holds and no budget. A replica cannot stream more than its HBM,
    so the fallback overestimates and never oversubscribes a GPU."""
    req = demand.size_on(product) if demand is not None else None
    step = e.step_bytes
    if step is None:
        fits = req is not None and req.tp == len(e.gpus)
        step = min(req.step_bytes, e.hbm_per_gpu) if fits else e.hbm_per_gpu
    return Load(step, req.step_budget if req is not None else None)


@dataclass(eq=False, slots=True)
class Placed:
    """A replica this run placed: ``state`` is None while consolidation or repair holds
    it in hand, between taking it off its GPUs and putting it back."""

    demand: Demand
    state: Optional["NodeState"]
    gpus: tuple[int, ...]
    req: Requirement


class NodeState:
    """Free HBM, streamed bytes, budgets and tenants of each GPU of one node."""

    __slots__ = ("node", "index", "cap", "free", "tenants", "streamed", "budgets", "models",
                 "on_gpu", "pods_left", "version")

    def __init__(self, node: Node, index: int, cap: int) -> None:
        self.node = node
        self.index = index  # position in the snapshot: the final tie-breaker
        self.cap = cap  # usable bytes per GPU after the reserve
        self.free = [cap] * node.gpus
        self.tenants = [0] * node.gpus  # replicas holding HBM on each GPU
        self.streamed = [0] * node.gpus  # bytes per decode step, all tenants
        self.budgets: list[list[int]] = [[] for _ in range(node.gpus)]  # tenants' budgets
        self.models: dict[str, int] = {}  # model -> replicas on this node
        # model -> replicas with a shard on the GPU, per GPU (the spread at GPU level)
        self.on_gpu: list[dict[str, int]] = [{} for _ in range(node.gpus)]
        # Replicas it may still take (the node's pod limit; negative when it holds more).
        self.pods_left = node.max_pods if node.max_pods is not None else 1 << 30
        self.version = 0

    def limit(self, g: int) -> Optional[int]:
        """The step-byte budget of GPU ``g``: its tightest tenant's; None: no target."""
        return min(self.budgets[g]) if self.budgets[g] else None

    def fits(self, g: int, req: Requirement, share: bool,
             apart: Optional[Apart] = None) -> bool:
        """``gpu_fits`` on GPU ``g``, on a node whose pod limit takes one more replica
        and, for a spread model (``apart``), on a GPU below its limit of the model."""
        return (self.pods_left > 0
                and (apart is None or self.on_gpu[g].get(apart.model, 0) < apart.gpu_cap)
                and gpu_fits(self.free[g], self.tenants[g], self.streamed[g], self.limit(g),
                             req, share))

    def shards(self, g: int, req: Requirement, share: bool,
               apart: Optional[Apart] = None) -> int:
        """How many shards of ``req`` GPU ``g`` holds at once (by both resources, the
        node's pod limit and the model's spread limit on the GPU)."""
        if not self.fits(g, req, share, apart):
            return 0
        if not share:
            return 1
        k = self.free[g] // req.hbm_per_gpu if req.hbm_per_gpu else 1 << 20
        k = min(k, self.pods_left)
        if apart is not None:
            k = min(k, apart.gpu_room(self, g))
        budget = tighter(self.limit(g), req.step_budget)
        if budget is not None and req.step_bytes:
            k = min(k, (budget - self.streamed[g]) // req.step_bytes)
        return k

    def eligible_free(self, share: bool) -> list[int]:
        """Free bytes of the GPUs a new replica may use, largest first."""
        if share:
            return sorted(self.free, reverse=True)
        return sorted((f for f, t in zip(self.free, self.tenants) if t == 0), reverse=True)

    def fitting_gpus(self, req: Requirement, share: bool,
                     apart: Optional[Apart] = None) -> list[int]:
        """GPUs a shard of ``req`` fits (``gpu_fits``, and below the spread limit)."""
        return [g for g in range(self.node.gpus) if self.fits(g, req, share, apart)]

    def add(self, model: str, gpus: tuple[int, ...], hbm: int, step: int = 0,
            budget: Optional[int] = None) -> None:
        for g in gpus:
            self.free[g] -= hbm
            self.tenants[g] += 1
            self.streamed[g] += step
            if budget is not None:
                self.budgets[g].append(budget)
            self.on_gpu[g][model] = self.on_gpu[g].get(model, 0) + 1
        self.models[model] = self.models.get(model, 0) + 1
        self.pods_left -= 1
        self.version += 1

    def remove(self, model: str, gpus: tuple[int, ...], hbm: int, step: int = 0,
               budget: Optional[int] = None) -> None:
        for g in gpus:
            self.free[g] += hbm
            self.tenants[g] -= 1
            self.streamed[g] -= step
            if budget is not None:
                self.budgets[g].remove(budget)
            self.on_gpu[g][model] -= 1
        self.models[model] -= 1
        self.pods_left += 1
        self.version += 1


# Entries at a spreading model's limits a candidate window passes over, at most, before
# it stops: enough to find GPUs in use elsewhere, bounded at fleet scale.
APART_SKIP = 1024


def _remove(lst: list, key: tuple) -> None:
    i = bisect_left(lst, key)
    if i < len(lst) and lst[i] == key:
        del lst[i]


class Pool:
    """The schedulable nodes of one GPU product, indexed three ways.

    - ``open_gpus``: (free, node, gpu) of every GPU already in use: its low end past a
      need is the best fit among GPUs that carry load (packing).
    - ``by_tp[t]``: (t-th largest eligible free GPU, node): a node qualifies for a
      replica of TP t needing x per GPU iff its key >= x, so the entry found by bisect
      is the tightest node that fits, and "no entry" means no node fits (exactly).
    - ``by_total``: (total free, node): its high end is the least-allocated node
      (spreading).
    """

    def __init__(self, product: str, states: list[NodeState], share: bool,
                 spread: bool = True) -> None:
        self.product = product
        self.share = share
        self.spread = spread  # by_total is kept only when something spreads
        self.states = states
        self.by_index = {s.index: s for s in states}
        self.max_gpus = max((s.node.gpus for s in states), default=0)
        self.open_gpus: list[tuple[int, int, int]] = []
        self.by_total: list[tuple[int, int]] = []
        self.by_tp: dict[int, list[tuple[int, int]]] = {}
        for s in states:
            for g, t in enumerate(s.tenants):
                if t > 0:
                    self.open_gpus.append((s.free[g], s.index, g))
            if spread:
                self.by_total.append((sum(s.free), s.index))
        self.open_gpus.sort()
        self.by_total.sort()

    def tp_index(self, tp: int) -> list[tuple[int, int]]:
        lst = self.by_tp.get(tp)
        if lst is None:
            lst = []
            for s in self.states:
                if s.node.gpus >= tp:
                    free = s.eligible_free(self.share)
                    lst.append((free[tp - 1] if len(free) >= tp else -1, s.index))
            lst.sort()
            self.by_tp[tp] = lst
        return lst

    def _node_keys(self, s: NodeState) -> tuple[list[int], int]:
        return s.eligible_free(self.share), (sum(s.free) if self.spread else 0)

    def _change(self, s: NodeState, gpus: tuple[int, ...], apply) -> None:
        """Apply ``apply()`` to ``s`` (which changes ``gpus``), moving only the index
        entries that change."""
        idx = s.index
        before = [(s.free[g], idx, g) for g in gpus if s.tenants[g] > 0]
        free_before, total_before = self._node_keys(s)
        apply()
        for key in before:
            _remove(self.open_gpus, key)
        for g in gpus:
            if s.tenants[g] > 0:
                insort(self.open_gpus, (s.free[g], idx, g))
        free_after, total_after = self._node_keys(s)
        if self.spread:
            _remove(self.by_total, (total_before, idx))
            insort(self.by_total, (total_after, idx))
        n_before, n_after = len(free_before), len(free_after)
        for tp, lst in self.by_tp.items():
            if s.node.gpus < tp:
                continue
            old = free_before[tp - 1] if n_before >= tp else -1
            new = free_after[tp - 1] if n_after >= tp else -1
            if old != new:
                _remove(lst, (old, idx))
                insort(lst, (new, idx))

    def update(self, s: NodeState, model: str, gpus: tuple[int, ...], req: Requirement
               ) -> None:
        """Place a replica of ``req`` on ``gpus`` of ``s``, keeping the indexes in step."""
        self._change(s, gpus, lambda: s.add(model, gpus, req.hbm_per_gpu, req.step_bytes,
                                             req.step_budget))

    def release(self, s: NodeState, model: str, gpus: tuple[int, ...], req: Requirement
                ) -> None:
        """Take a replica of ``req`` off ``gpus`` of ``s`` again (a replica that moves)."""
        self._change(s, gpus, lambda: s.remove(model, gpus, req.hbm_per_gpu, req.step_bytes,
                                               req.step_budget))

    def _window(self, lst: list, i: int, k: int, apart: Optional[Apart],
                gpu: bool) -> Iterator[int]:
        """Nodes of the first ``k`` entries of ``lst`` from ``i`` on that ``apart``
        allows (a node below the node limit; for a GPU entry, a GPU below the GPU
        limit), passing over at most ``APART_SKIP`` others."""
        if apart is None:
            for j in range(i, min(len(lst), i + k)):
                yield lst[j][1]
            return
        found = skipped = 0
        for j in range(i, len(lst)):
            s = self.by_index[lst[j][1]]
            if apart.node_allows(s) and (not gpu or apart.gpu_room(s, lst[j][2]) > 0):
                yield s.index
                found += 1
                if found == k:
                    return
            else:
                skipped += 1
                if skipped > APART_SKIP:
                    return

    def fitting_nodes(self, tp: int, need: int) -> Iterator[int]:
        """Every node with ``tp`` eligible GPUs of ``need`` free HBM, tightest first (by
        HBM: the fit predicate still decides)."""
        lst = self.tp_index(tp)
        for j in range(bisect_left(lst, (need,)), len(lst)):
            yield lst[j][1]

    def candidates(self, tp: int, need: int, k: int, spread: bool,
                   apart: Optional[Apart] = None) -> Iterator[int]:
        """A bounded set of nodes to score (node indices, may repeat).

        Pure packing's best node is among the first: the tightest GPU in use that fits,
        or the tightest node that fits the whole TP group. Pure spreading's is the most
        free node. With mixed weights the best may lie between the windows and is
        missed: that biases the plan towards the nearest end, never towards a node
        that does not fit (every candidate still passes the filters). For a model that
        spreads (``apart``), the windows pass over GPUs and nodes at its limits (at most
        ``APART_SKIP`` of them each): the tightest GPUs in use are mostly its own.
        """
        if self.share and self.open_gpus:
            lst = self.open_gpus
            yield from self._window(lst, bisect_left(lst, (need,)), k, apart, True)
        lst = self.tp_index(tp)
        i = bisect_left(lst, (need,))
        yield from self._window(lst, i, k, apart, False)
        # And the node at the other end, with the most free: where a fresh GPU is.
        # Packing values a fresh GPU by its product, so when the tightest nodes of a
        # small product offer one, a large product's fresh GPU must be in the running.
        if len(lst) > i + k:
            yield lst[-1][1]
        if spread:
            for _, n in self.by_total[-k:]:
                yield n
