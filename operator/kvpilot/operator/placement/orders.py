"""In which order models are placed: largest first, and the other orders tried on small
instances (which replicas get a scarce large product is decided by the order)."""

from __future__ import annotations

from kvpilot.operator.placement.model import Demand, Requirement
from kvpilot.operator.placement.plan_state import PlanState
from kvpilot.operator.placement.state import Pool


def largest_first(state: PlanState) -> list[Demand]:
    """Largest replica first (HBM over all its GPUs, then per GPU), then by name."""
    def size(d: Demand) -> tuple[int, int]:
        return max(((r.total, r.hbm_per_gpu) for _, r in state.sized(d)), default=(0, 0))

    return sorted(state.demands, key=lambda d: (tuple(-x for x in size(d)), d.model))


def alternative_orders(state: PlanState, incomplete: bool = False) -> list[list[str]]:
    """Other model orders worth a plan on a small instance, most promising first, each
    once and none equal to largest first: when the plan so far leaves replicas unplaced,
    smallest first (what places the most replicas when not all fit) and loosest ITL
    first (a tight budget placed early caps every GPU it lands on), then every adjacent
    pair of largest first swapped (front to back), then decreasing HBM per GPU, then, when the largest product is scarce,
    decreasing GPUs saved per GPU of it (``saved_per_scarce``). Largest first decides
    which replicas get a scarce product by size alone; a model that packs three to an
    H200 GPU and one to an 80 GB GPU may deserve it more than a larger one that needs
    the same GPUs on either. Model names only: deterministic.
    """
    base = [d.model for d in largest_first(state)]
    rank = {m: i for i, m in enumerate(base)}
    seen = {tuple(base)}
    out: list[list[str]] = []

    def add(order: list[str]) -> None:
        if tuple(order) not in seen:
            seen.add(tuple(order))
            out.append(order)

    if incomplete:
        add(list(reversed(base)))

        def tightness(m: str) -> float:
            budgets = [r.step_budget / r.step_bytes for _, r in state.sized(state.by_model[m])
                       if r.step_budget is not None and r.step_bytes]
            return min(budgets, default=float("inf"))

        add(sorted(base, key=lambda m: (-tightness(m), rank[m])))
    for i in range(len(base) - 1):
        swapped = list(base)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        add(swapped)

    def per_gpu(m: str) -> int:
        return max((r.hbm_per_gpu for _, r in state.sized(state.by_model[m])), default=0)

    add(sorted(base, key=lambda m: (-per_gpu(m), rank[m])))
    largest = state.largest_pool()
    if state.scarce and largest is not None:
        add(sorted(base, key=lambda m: (-saved_per_scarce(state, m, largest), rank[m])))
    return out


def saved_per_scarce(state: PlanState, model: str, largest: Pool) -> float:
    """GPUs one replica saves by running on the largest product instead of the cheapest
    other one, per GPU of the largest it takes; a single-GPU replica takes 1/k of a GPU
    that holds k of it. -1 where it cannot run on the largest."""
    d = state.by_model[model]
    here_req = d.requirement(largest.product)
    if here_req is None or here_req.tp > largest.max_gpus:
        return -1.0

    def gpus(req: Requirement, cap: int) -> float:
        if req.tp > 1:
            return float(req.tp)
        return 1.0 / max(1, cap // req.hbm_per_gpu)

    here = gpus(here_req, largest.states[0].cap)
    other = [gpus(r, p.states[0].cap) for p, r in state.sized(d)
             if p is not largest and r.tp <= p.max_gpus]
    return (min(other) - here) / here if other else 0.0
