"""Filters: each looks at one node and says why a replica cannot go there, or None.

As in the Kubernetes scheduler framework, a node is feasible when every filter passes.
They run cheapest first, and the short reasons they return are tallied into the message
of a replica that fits nowhere ("0/5 nodes fit: 2 cordoned, 3 not enough free HBM").
"""

from __future__ import annotations

from typing import Callable, Optional

from kvpilot.operator.placement.model import Demand, Policy, Requirement
from kvpilot.operator.placement.state import Apart, NodeState

Filter = Callable[[NodeState, Demand, Optional[Requirement], Policy], Optional[str]]


def node_schedulable(s: NodeState, demand: Demand, req: Optional[Requirement],
                     policy: Policy) -> Optional[str]:
    if not s.node.ready:
        return "not Ready"
    if s.node.cordoned:
        return "cordoned"
    return None


def product_allowed(s: NodeState, demand: Demand, req: Optional[Requirement],
                    policy: Policy) -> Optional[str]:
    return None if demand.allows(s.node.product) else "GPU product not allowed"


def product_fits(s: NodeState, demand: Demand, req: Optional[Requirement],
                 policy: Policy) -> Optional[str]:
    return None if req is not None else "GPU too small at any tensorParallel"


def tp_on_one_node(s: NodeState, demand: Demand, req: Optional[Requirement],
                   policy: Policy) -> Optional[str]:
    assert req is not None
    return None if s.node.gpus >= req.tp else f"fewer than {req.tp} GPUs"


def pods_free(s: NodeState, demand: Demand, req: Optional[Requirement],
              policy: Policy) -> Optional[str]:
    return None if s.pods_left > 0 else f"pod limit reached ({s.node.max_pods} pods)"


def fits_hbm(s: NodeState, demand: Demand, req: Optional[Requirement],
             policy: Policy) -> Optional[str]:
    assert req is not None
    share, need = policy.share_gpus, req.hbm_per_gpu
    if sum(1 for f, t in zip(s.free, s.tenants) if f >= need and (share or not t)) >= req.tp:
        return None
    return "not enough free HBM" if share else "not enough unshared GPUs"


def fits_bandwidth(s: NodeState, demand: Demand, req: Optional[Requirement],
                   policy: Policy) -> Optional[str]:
    """The whole fit predicate (``gpu_fits``): of the GPUs with the HBM free, enough
    whose tenants, this replica included, stream their bytes per decode step within the
    tightest ITL target among them."""
    assert req is not None
    if len(s.fitting_gpus(req, policy.share_gpus)) >= req.tp:
        return None
    return "not enough HBM bandwidth for the ITL targets"


def spread_allows(s: NodeState, apart: Optional[Apart]) -> Optional[str]:
    """The spread filter of a model whose replicas keep to distinct nodes
    (``Demand.spread``): a node that holds as many of them as the model's limit stands
    at takes no more. Its limit moves within a run (``spread.relax``), so it is
    not one of ``FILTERS``; the engine, the packing steps and the ILP ask it beside
    them. At GPU level the same limit is part of the fit (``NodeState.fits``)."""
    if apart is None or apart.node_allows(s):
        return None
    if apart.node_cap == 1:
        return "holding a replica of it"
    return f"holding {apart.node_cap} replicas of it"


FILTERS: tuple[Filter, ...] = (
    node_schedulable, product_allowed, product_fits, tp_on_one_node, pods_free, fits_hbm,
    fits_bandwidth,
)
# All but the last, the fit predicate on each GPU: scoring asks that of every GPU anyway
# (``scores.score_node`` chooses no GPUs where fewer than TP fit), so it need not run twice.
BEFORE_SCORING: tuple[Filter, ...] = FILTERS[:-1]


def first_failure(s: NodeState, demand: Demand, policy: Policy,
                  filters: tuple[Filter, ...] = FILTERS) -> Optional[str]:
    """The reason of the first of ``filters`` that rejects ``s``, or None when it is
    feasible."""
    req = demand.requirement(s.node.product)
    for f in filters:
        reason = f(s, demand, req, policy)
        if reason is not None:
            return reason
    return None
