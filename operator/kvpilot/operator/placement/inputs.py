"""Placement inputs from API objects: a snapshot from a fleet, demands from Models.

The per-replica requirement comes from the memory model alone (``kvpilot.api.memory``);
nothing here restates its formula.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from kvpilot.api.fleet import FleetNode
from kvpilot.api.memory import (
    TP_DEGREES, replica_budget, smallest_tp, tp_is_valid, usable_hbm,
)
from kvpilot.api.model import Model, ModelSpec
from kvpilot.api.quantity import format_bytes
from kvpilot.operator.placement.model import Demand, Node, Policy, Requirement, Snapshot


def snapshot_from_fleet(nodes: Iterable[FleetNode]) -> Snapshot:
    """A snapshot of an empty fleet (what ``kvpilot plan`` plans onto)."""
    return Snapshot(nodes=tuple(
        Node(n.name, n.product, n.gpus, n.gpu_hbm_bytes, cordoned=n.unschedulable)
        for n in nodes
    ))


def gpu_kinds(snapshot: Snapshot) -> dict[str, tuple[int, int]]:
    """Product -> (HBM per GPU, most GPUs on one node).

    Should two nodes report the same product with different memory, the smaller is
    used: a requirement sized for it holds on both.
    """
    kinds: dict[str, tuple[int, int]] = {}
    for n in snapshot.nodes:
        hbm, gpus = kinds.get(n.product, (n.gpu_hbm, 0))
        kinds[n.product] = (min(hbm, n.gpu_hbm), max(gpus, n.gpus))
    return kinds


def requirement(spec: ModelSpec, gpu_hbm: int, max_gpus: int,
                reserve: float = 0.0) -> Requirement | str:
    """What one replica needs on GPUs of ``gpu_hbm`` bytes, or why it cannot fit there.

    TP auto picks the smallest degree whose per-GPU budget fits this product, so a model
    may run at TP 1 on H200 and TP 2 on H100.
    """
    tp = smallest_tp(spec, gpu_hbm, max_gpus=max_gpus, reserve_fraction=reserve)
    if tp is not None:
        b = replica_budget(spec, tp)
        return Requirement(tp, b.per_gpu, b.kv_cache // b.kv_bytes_per_token)
    usable = format_bytes(usable_hbm(gpu_hbm, reserve))
    if spec.tensor_parallel != "auto":
        t = spec.tensor_parallel
        if t > max_gpus:
            return f"tensorParallel {t} needs {t} GPUs on one node, nodes have at most {max_gpus}"
        return (f"needs {format_bytes(replica_budget(spec, t).per_gpu)} per GPU at "
                f"tensorParallel {t}, a GPU holds {usable}")
    valid = [t for t in TP_DEGREES if t <= max_gpus and tp_is_valid(spec, t)]
    if not valid:
        return f"no valid tensorParallel fits nodes of {max_gpus} GPUs"
    t = valid[-1]
    return (f"needs {format_bytes(replica_budget(spec, t).per_gpu)} per GPU even at "
            f"tensorParallel {t} (the most GPUs on one node), a GPU holds {usable}")


def demand_for(name: str, spec: ModelSpec, snapshot: Snapshot, policy: Policy,
               replicas: int | None = None) -> Demand:
    """One model's demand over the products of ``snapshot``."""
    reqs: dict[str, Requirement] = {}
    unfit: dict[str, str] = {}
    for product, (hbm, gpus) in sorted(gpu_kinds(snapshot).items()):
        if spec.gpu_products and product not in spec.gpu_products:
            continue
        r = requirement(spec, hbm, gpus, policy.reserve)
        if isinstance(r, Requirement):
            reqs[product] = r
        else:
            unfit[product] = r
    return Demand(
        model=name, replicas=spec.replicas if replicas is None else replicas,
        requirements=reqs, products=tuple(spec.gpu_products), unfit=unfit, spec=spec,
    )


def demands_from_models(models: Sequence[Model], snapshot: Snapshot,
                        policy: Policy) -> list[Demand]:
    """Demands of Model objects, in their order; a name may appear once."""
    seen: set[str] = set()
    out = []
    for m in models:
        name = m.metadata.name
        if name in seen:
            raise ValueError(f"model {name!r} appears twice")
        seen.add(name)
        out.append(demand_for(name, m.spec, snapshot, policy))
    return out
