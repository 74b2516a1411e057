"""Why a replica fits nowhere, and what would make it fit: one line a person can act on.

"needs 2 GPUs with >= 61.3 GiB free each on NVIDIA-H100-80GB-HBM3; largest free set on
any allowed node is 1 x 79.1 GiB (h100-0); try kvCacheDtype fp8 or tensorParallel 4
(0/3 nodes fit: 1 cordoned, 2 not enough free HBM)"

"Largest free set" counts the GPUs of the closest node that have what one GPU of the
replica needs (here one); when none has, it is the node's best set of as many GPUs as the
replica needs, all short of it.

Fixes are suggested only when applying them would let one replica fit now: the changed
spec is sized as the operator sizes it (TP auto per product, latency targets), at a
tensorParallel kvpilot's worker runs, and must pass every filter placement applies on
some node (:func:`fits_now`). An SLA reduction is the largest that passes.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Optional

from kvpilot.api.memory import (
    TP_DEGREES, kv_bytes_per_sequence, max_context_within, replica_budget, tp_is_valid,
)
from kvpilot.api.quantity import format_bytes
from kvpilot.api.support import WORKER_MAX_TENSOR_PARALLEL, worker_support_problem
from kvpilot.operator.placement.filters import first_failure, product_fits, spread_allows
from kvpilot.operator.placement.inputs import requirement
from kvpilot.operator.placement.model import Demand, Policy, Requirement
from kvpilot.operator.placement.state import Apart, NodeState, tighter


class BestSet(NamedTuple):
    """The closest a node comes to holding a replica: ``with_need`` of its GPUs (at most
    the replica's TP) have what one GPU of it needs free, and (``gpus``, ``size``)
    describes them: that many GPUs with at least ``size`` free each. When no GPU has the
    need, (``gpus``, ``size``) is its best set of up to TP GPUs instead, all short.
    ``node`` is None when no node of the product has a GPU free."""

    with_need: int
    gpus: int
    size: int
    node: Optional[str]


class _Free:
    """Free HBM of every schedulable node below its pod limit, by product: sorted
    eligible GPUs per node."""

    def __init__(self, states: list[NodeState], share: bool) -> None:
        self.by_product: dict[str, list[tuple[list[int], NodeState]]] = {}
        self.loaded: set[str] = set()  # products where replicas hold HBM already
        for s in states:
            if s.node.schedulable and s.pods_left > 0:
                self.by_product.setdefault(s.node.product, []).append(
                    (s.eligible_free(share), s))
                if any(s.tenants):
                    self.loaded.add(s.node.product)

    def fits(self, product: str, tp: int, need: int) -> bool:
        return any(len(f) >= tp and f[tp - 1] >= need for f, _ in self.by_product.get(product, ()))

    def best_set(self, product: str, tp: int, need: int) -> "BestSet":
        """The closest a node of ``product`` comes to holding ``tp`` GPUs with ``need``
        free each (``BestSet``)."""
        best_key: Optional[tuple] = None
        best = BestSet(0, 0, 0, None)
        for free, s in self.by_product.get(product, ()):
            if not free:
                continue
            k = sum(1 for f in free[:tp] if f >= need)
            n = k if k else min(tp, len(free))
            size = max(0, free[n - 1])
            key = (k, size if k else 0, n, size, -s.index)
            if best_key is None or key > best_key:
                best_key, best = key, BestSet(k, n, size, s.node.name)
        return best

    def best_group(self, product: str, tp: int) -> int:
        """The most free HBM every GPU of some ``tp``-GPU set of ``product`` has."""
        return max((f[tp - 1] for f, _ in self.by_product.get(product, ()) if len(f) >= tp),
                   default=0)


def explain(demand: Demand, states: list[NodeState], policy: Policy) -> str:
    """The reason one replica of ``demand`` fits on no node of ``states`` right now."""
    total = len(states)
    if total == 0:
        return "the fleet has no GPU nodes"
    tally = Counter(_node_reason(s, demand, policy) for s in states)
    summary = f"0/{total} nodes fit: " + ", ".join(
        f"{n} {r}" for r, n in sorted(tally.items(), key=lambda x: (-x[1], x[0]))
    )
    free = _Free(states, policy.share_gpus)
    products = sorted(free.by_product)
    allowed = [p for p in products if demand.allows(p)]
    full = sorted(s.node.name for s in states if s.node.schedulable and s.pods_left <= 0
                  and demand.requirement(s.node.product) is not None)
    if not allowed and full:
        return (f"every node it fits is at its pod limit ({', '.join(full[:3])}"
                f"{', ...' if len(full) > 3 else ''}): add nodes or raise maxPods "
                f"({summary})")
    if not allowed:
        wanted = ", ".join(demand.products)
        have = ", ".join(products) or "none"
        main = (f"no schedulable node has an allowed GPU product (gpuProducts: {wanted}; "
                f"schedulable products: {have})")
        return (f"{main}; {_join(_other_products(demand, free, products, states, policy))} "
                f"({summary})")
    sized = [(p, demand.requirement(p)) for p in allowed]
    fitting = [(p, r) for p, r in sized if r is not None]
    if not fitting:
        why = "; ".join(f"{p}: {demand.unfit.get(p, 'does not fit')}" for p in allowed)
        fixed = demand.spec is not None and demand.spec.tensor_parallel != "auto"
        at = f"tensorParallel {demand.spec.tensor_parallel}" if fixed else "any tensorParallel"
        main = f"fits no allowed GPU product at {at} ({why})"
        fixes = _fixes(demand, free, allowed, products, None, states, policy)
        if not fixes and "; try " not in why:  # a product's own fixes say it already
            fixes = _no_fix(demand, free, allowed, None)
        return f"{main}{'; ' + fixes if fixes else ''} ({summary})"
    # The product where the replica comes closest: most GPUs with enough HBM, then size.
    scored = []
    for p, r in fitting:
        k, n, size, node = free.best_set(p, r.tp, r.hbm_per_gpu)
        scored.append(((k, n * size / r.total), p, r, n, size, node))
    scored.sort(key=lambda x: (-x[0][0], -x[0][1], x[1]))
    _, product, req, n, size, node = scored[0]
    if n == req.tp and size >= req.hbm_per_gpu and req.step_budget is not None:
        return _bandwidth_reason(demand, states, policy, product, req, summary)
    gpus = "1 GPU" if req.tp == 1 else f"{req.tp} GPUs"
    each = "" if req.tp == 1 else " each"
    main = f"needs {gpus} with >= {format_bytes(req.hbm_per_gpu)} free{each} on {product}"
    if node is None:
        unshared = "" if policy.share_gpus else " unshared"
        best = f"no allowed node has a{unshared} GPU free"
    else:
        best = f"largest free set on any allowed node is {n} x {format_bytes(size)} ({node})"
    closest = (product, req.tp, free.best_group(product, req.tp))
    fixes = (_fixes(demand, free, allowed, products, closest, states, policy)
             or _no_fix(demand, free, allowed, closest))
    return f"{main}; {best}; {fixes} ({summary})"


def crowding_tally(demand: Demand, states: list[NodeState], policy: Policy,
                   apart: Apart, fewest: Optional[int] = None) -> Counter:
    """What stops each node from taking one more replica of a spreading model within its
    limits ``apart`` at its ``fewest`` GPUs (a product where it needs more does not
    count: spreading never raises its tensorParallel), tallied; "fits" counts the nodes
    that would take it."""
    tally: Counter = Counter()
    for s in states:
        reason = first_failure(s, demand, policy) or spread_allows(s, apart)
        req = demand.requirement(s.node.product)
        if reason is None and req is not None and fewest is not None and req.tp > fewest:
            reason = f"needing tensorParallel {req.tp} there"
        if reason is None:
            reason = ("fits" if req is not None and len(s.fitting_gpus(
                req, policy.share_gpus, apart)) >= req.tp
                else "room only on GPUs holding a replica of it")
        tally[reason] += 1
    return tally


def crowding(demand: Demand, states: list[NodeState], policy: Policy, apart: Apart,
             fewest: Optional[int] = None) -> str:
    """Why a replica of a model that spreads must share a node or GPU with another of
    it: no node or GPU within the model's limits ``apart`` has room at its ``fewest``
    GPUs, with the tally of what stops each node ("0/4 nodes fit: 2 holding a replica
    of it, 2 not enough free HBM")."""
    tally = crowding_tally(demand, states, policy, apart, fewest)
    summary = f"0/{len(states)} nodes fit: " + ", ".join(
        f"{n} {r}" for r, n in sorted(tally.items(), key=lambda x: (-x[1], x[0])))
    if demand.apart_nodes:
        main = "every node with room for another replica of the Model holds one already"
    else:
        main = "every GPU with room for another replica of the Model holds one already"
    return f"spread {demand.spread}: {main} ({summary})"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _bandwidth_reason(demand: Demand, states: list[NodeState], policy: Policy, product: str,
                      req, summary: str) -> str:
    """The HBM is free somewhere, but no GPU set with it can stream one more replica's
    bytes per decode step within the tightest ITL target of its tenants."""
    best, where = -1, None
    for s in states:
        if not s.node.schedulable or s.node.product != product or s.node.gpus < req.tp:
            continue
        rooms = sorted((tighter(s.limit(g), req.step_budget) - s.streamed[g]
                        for g in range(s.node.gpus)
                        if s.free[g] >= req.hbm_per_gpu and (policy.share_gpus or not s.tenants[g])),
                       reverse=True)
        if len(rooms) >= req.tp and rooms[req.tp - 1] > best:
            best, where = rooms[req.tp - 1], s.node.name
    gpus = "1 GPU" if req.tp == 1 else f"{req.tp} GPUs"
    main = (f"needs {gpus} with >= {format_bytes(req.hbm_per_gpu)} free and room for "
            f"{_gb(req.step_bytes)} per decode step on {product}; the GPUs with that HBM free "
            f"have at most {_gb(max(0, best))} per step left within their tenants' ITL targets "
            f"({where})")
    tries = []
    spec = demand.spec
    if spec is not None and best > 0:
        per_sequence = kv_bytes_per_sequence(spec.architecture, spec.kv_cache_dtype,
                                             spec.sla.context_tokens, req.tp)
        kv = per_sequence * spec.sla.concurrent_sequences
        weights = req.step_bytes - kv
        if per_sequence and best > weights:
            sequences = (best - weights) // per_sequence
            if 1 <= sequences < spec.sla.concurrent_sequences:
                tries.extend(_verified_sla(spec, "concurrentSequences", sequences, states,
                                           policy))
        if spec.kv_cache_dtype in ("bf16", "fp16") and weights + kv // 2 <= best and fits_now(
                spec.model_copy(update={"kv_cache_dtype": "fp8"}), states, policy):
            tries.append("kvCacheDtype fp8")
    tries.extend(["a looser interTokenLatencyMilliseconds", "adding GPU nodes"])
    return f"{main}; {_join(tries)} ({summary})"


def _node_reason(s: NodeState, demand: Demand, policy: Policy) -> str:
    """The first filter's reason for ``s``; a fixed tensorParallel larger than the node
    is said as such, not as a GPU too small."""
    reason = first_failure(s, demand, policy)
    if reason is None:
        return "fits"
    spec = demand.spec
    if (spec is not None and spec.tensor_parallel != "auto"
            and spec.tensor_parallel > s.node.gpus
            and reason == product_fits(s, demand, None, policy)):
        return f"fewer than {spec.tensor_parallel} GPUs"
    return reason


def fits_now(spec, states: list[NodeState], policy: Policy) -> bool:
    """Would one replica of ``spec`` fit on some node of ``states`` now? Sized as the
    operator sizes it on each node's product, served by kvpilot's worker (unless the
    policy plans without ``worker_limits``), and passing every filter placement
    applies: how a suggested fix is checked."""
    for s in states:
        if not s.node.schedulable or (spec.gpu_products
                                      and s.node.product not in spec.gpu_products):
            continue
        r = requirement(spec, s.node.gpu_hbm, s.node.gpus, policy.reserve, s.node.gpu)
        if not isinstance(r, Requirement) or (policy.worker_limits
                                              and worker_support_problem(spec, r.tp)):
            continue
        one = Demand("(fix)", 1, {s.node.product: r}, tuple(spec.gpu_products), spec=spec)
        if first_failure(s, one, policy) is None:
            return True
    return False


def _with_sla(spec, field: str, value: int):
    key = {"concurrentSequences": "concurrent_sequences", "contextTokens": "context_tokens"}
    return spec.model_copy(update={"sla": spec.sla.model_copy(update={key[field]: value})})


def _verified_sla(spec, field: str, value: int, states: list[NodeState],
                  policy: Policy) -> list[str]:
    """``field <= v`` for the largest v <= ``value`` with which a replica fits now (the
    memory model's ``value`` counts HBM only; latency and bandwidth may want less)."""
    lo, hi = 0, value
    while lo < hi:  # the largest v in [1, value] that fits; 0 when none does
        mid = (lo + hi + 1) // 2
        if fits_now(_with_sla(spec, field, mid), states, policy):
            lo = mid
        else:
            hi = mid - 1
    return [f"{field} <= {lo}"] if lo else []


def _fixes(demand: Demand, free: _Free, allowed: list[str], products: list[str],
           closest: Optional[tuple[str, int, int]], states: list[NodeState],
           policy: Policy) -> str:
    """'try A, B or C', each fix one that :func:`fits_now`; "" when none is."""
    spec = demand.spec
    tries: list[str] = []
    if spec is not None:
        if spec.kv_cache_dtype != "fp8" and fits_now(
                spec.model_copy(update={"kv_cache_dtype": "fp8"}), states, policy):
            tries.append("kvCacheDtype fp8")
        tp = _larger_tp(spec, states, policy, closest[1] if closest else 0)
        if tp is not None:
            tries.append(f"tensorParallel {tp}")
        found = (_sla_fit(spec, closest[1], closest[2]) if closest is not None
                 else _sla_on_any(spec, free, allowed))
        if found is not None:
            tries.extend(_verified_sla(spec, found.field, found.value, states, policy))
    tries.extend(_other_products(demand, free, products, states, policy))
    return _join(tries) if tries else ""


def _no_fix(demand: Demand, free: _Free, allowed: list[str],
            closest: Optional[tuple[str, int, int]]) -> str:
    """What to do when no change of the Model would fit it now."""
    spec = demand.spec
    tp = closest[1] if closest else 0
    if spec is not None and spec.tensor_parallel != "auto":
        tp = spec.tensor_parallel
    most = max((s.node.gpus for p in allowed for _, s in free.by_product.get(p, ())), default=0)
    if most < tp:
        return f"no allowed node has {tp} GPUs (the most is {most}): add nodes with {tp} or more"
    if any(p in free.loaded for p in allowed):
        return "free HBM is held by other replicas: scale some down or add GPU nodes"
    return ("no allowed GPU holds the weights and overhead of one replica, even with "
            "nothing else on it: add nodes with larger GPUs or more GPUs per node")


def _join(tries: list[str]) -> str:
    if not tries:
        return "add nodes with an allowed GPU product"
    if len(tries) == 1:
        return f"try {tries[0]}"
    return f"try {', '.join(tries[:-1])} or {tries[-1]}"


def _candidate_tps(spec, max_tp: int = 10**6) -> list[int]:
    if spec.tensor_parallel != "auto":
        return [spec.tensor_parallel]
    return [t for t in TP_DEGREES if t <= max_tp and tp_is_valid(spec, t)]


def _larger_tp(spec, states: list[NodeState], policy: Policy, current: int) -> Optional[int]:
    """The smallest fixed tensorParallel above ``current`` with which a replica fits now."""
    for t in TP_DEGREES:
        if t <= current or not tp_is_valid(spec, t) or t == spec.tensor_parallel:
            continue
        if fits_now(spec.model_copy(update={"tensor_parallel": t}), states, policy):
            return t
    return None


class SlaFit(NamedTuple):
    """An SLA field lowered to ``value`` so that a replica fits; of two, the larger is
    the better fix (fewer sequences, rank 1, before a shorter context, rank 0)."""

    rank: int
    field: str
    value: int


def _sla_fit(spec, tp: int, best_free: int) -> Optional[SlaFit]:
    """The SLA that fits ``best_free`` per GPU at ``tp``: fewer sequences first, else
    shorter contexts; None when neither does."""
    b = replica_budget(spec, tp)
    room = best_free - b.weights - b.overhead
    if room <= 0:
        return None
    sequences = room // b.kv_bytes_per_sequence
    if 1 <= sequences < spec.sla.concurrent_sequences:
        return SlaFit(1, "concurrentSequences", sequences)
    tokens = max_context_within(spec.architecture, spec.kv_cache_dtype,
                                room // spec.sla.concurrent_sequences, tp)
    if 1 <= tokens < spec.sla.context_tokens:
        return SlaFit(0, "contextTokens", tokens)
    return None


def _sla_on_any(spec, free: _Free, allowed: list[str]) -> Optional[SlaFit]:
    """The least reduction of the SLA whose budget fits some allowed product at some
    tensorParallel a worker runs, when no product holds the SLA as it is."""
    fits = [f for p in allowed for t in _candidate_tps(spec, WORKER_MAX_TENSOR_PARALLEL)
            if (f := _sla_fit(spec, t, free.best_group(p, t))) is not None]
    return max(fits) if fits else None


def _other_products(demand: Demand, free: _Free, products: list[str],
                    states: list[NodeState], policy: Policy) -> list[str]:
    """Products that are not allowed but would hold a replica now."""
    spec = demand.spec
    out = []
    for p in products:
        if demand.allows(p):
            continue
        if spec is not None:
            wider = spec.model_copy(update={"gpu_products": [*spec.gpu_products, p]})
            if fits_now(wider, states, policy):
                out.append(f"adding {p} to gpuProducts")
        else:
            req = demand.size_on(p)
            if req is not None and free.fits(p, req.tp, req.hbm_per_gpu):
                out.append(f"adding {p} to gpuProducts")
    return out
