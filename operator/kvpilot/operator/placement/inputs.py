"""Placement inputs from API objects: a snapshot from a fleet, demands from Models.

The per-replica requirement comes from the memory model alone (``kvpilot.api.memory``);
nothing here restates its formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

from kvpilot.api.fleet import FleetNode
from kvpilot.api.gpus import LABEL_BANDWIDTH_GBPS, LABEL_BF16_TFLOPS, GPUProduct
from kvpilot.api.memory import (
    TP_DEGREES, decode_fixed_seconds, decode_step_bytes, decode_step_seconds, itl_step_bytes,
    prefill_seconds, replica_budget, tp_is_valid, usable_hbm,
)
from kvpilot.api.model import Model, ModelSpec
from kvpilot.api.quantity import format_bytes
from kvpilot.api.support import WORKER_MAX_TENSOR_PARALLEL, worker_support_problem
from kvpilot.operator.placement.model import Demand, Node, Policy, Requirement, Snapshot


def snapshot_from_fleet(nodes: Iterable[FleetNode], reserved_pods: int = 0) -> Snapshot:
    """A snapshot of an empty fleet (what ``kvpilot plan`` plans onto); a node that
    states its pods takes that many replicas less ``reserved_pods``, as the operator's."""
    return Snapshot(nodes=tuple(
        Node(n.name, n.product, n.gpus, n.gpu_hbm_bytes, cordoned=n.unschedulable,
             bandwidth_gbps=n.bandwidth_gbps, bf16_tflops=n.bf16_tflops,
             max_pods=None if n.max_pods is None else max(0, n.max_pods - reserved_pods))
        for n in nodes
    ))


def _slowest(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else min(a, b)


_KINDS: list = [None, None]  # (snapshot, its kinds): demands of many Models, one scan


def gpu_kinds(snapshot: Snapshot) -> dict[str, tuple[int, int, GPUProduct]]:
    """Product -> (HBM per GPU, most GPUs on one node, the GPU's facts).

    Should two nodes report the same product with different memory, bandwidth or FLOP/s,
    the smaller is used (unknown on one: unknown): a requirement sized for it holds on
    all of them. The last snapshot's answer is kept (a snapshot is immutable), so the
    demands of thousands of Models scan the nodes once.
    """
    if _KINDS[0] is snapshot:
        return _KINDS[1]
    kinds: dict[str, tuple[int, int, GPUProduct]] = {}
    stated: dict[str, tuple] = {}
    for n in snapshot.nodes:
        key = (n.bandwidth_gbps, n.bf16_tflops)
        if n.product in kinds and stated[n.product] == key:
            hbm, gpus, facts = kinds[n.product]
            kinds[n.product] = (min(hbm, n.gpu_hbm), max(gpus, n.gpus), facts)
            continue
        facts = n.gpu
        if n.product in kinds:
            hbm, gpus, seen = kinds[n.product]
            facts = replace(seen, bandwidth_gbps=_slowest(seen.bandwidth_gbps,
                                                          facts.bandwidth_gbps),
                            bf16_tflops=_slowest(seen.bf16_tflops, facts.bf16_tflops))
            kinds[n.product] = (min(hbm, n.gpu_hbm), max(gpus, n.gpus), facts)
        else:
            kinds[n.product] = (n.gpu_hbm, n.gpus, facts)
        stated[n.product] = key
    _KINDS[0], _KINDS[1] = snapshot, kinds
    return kinds


def _candidates(spec: ModelSpec, max_gpus: int) -> list[int]:
    """TP degrees a replica may take on nodes of ``max_gpus`` GPUs, smallest first."""
    tps = (spec.tensor_parallel,) if spec.tensor_parallel != "auto" else TP_DEGREES
    return [t for t in tps if t <= max_gpus and tp_is_valid(spec, t)]


def _latency_problem(spec: ModelSpec, tp: int, gpu: Optional[GPUProduct]) -> Optional[str]:
    """Why a replica alone at ``tp`` misses its latency targets on ``gpu``, or None."""
    itl, ttft = spec.sla.inter_token_latency_milliseconds, spec.sla.ttft_milliseconds
    if gpu is None:
        return None
    if itl is not None:
        if gpu.hbm_bandwidth is None:
            return (f"HBM bandwidth of {gpu.name} is unknown, so interTokenLatencyMilliseconds "
                    f"cannot be checked: label its nodes {LABEL_BANDWIDTH_GBPS}=<GB/s>")
        step = decode_step_bytes(spec, tp)
        if step > itl_step_bytes(spec, tp, gpu):
            seconds = decode_step_seconds(step, gpu, decode_fixed_seconds(spec, tp))
            return (f"a decode step takes {seconds * 1000:.1f} ms at tensorParallel {tp} "
                    f"(interTokenLatencyMilliseconds {itl})")
    if ttft is not None:
        if gpu.bf16_flops is None:
            return (f"bf16 FLOP/s of {gpu.name} are unknown, so ttftMilliseconds cannot be "
                    f"checked: label its nodes {LABEL_BF16_TFLOPS}=<TFLOP/s>")
        seconds = prefill_seconds(spec, tp, gpu)
        if seconds * 1000 > ttft:
            return (f"a prefill of {spec.sla.context_tokens} tokens takes "
                    f"{seconds * 1000:.0f} ms at tensorParallel {tp} (ttftMilliseconds {ttft})")
    return None


def _meets(spec: ModelSpec, tp: int, limit: int, gpu: Optional[GPUProduct]) -> bool:
    return replica_budget(spec, tp).per_gpu <= limit and _latency_problem(spec, tp, gpu) is None


def _latency_fixes(spec: ModelSpec, tp: int, limit: int, max_gpus: int,
                   gpu: GPUProduct) -> list[str]:
    """What would meet the latency targets on this product: fp8 KV, a larger TP (one
    kvpilot's worker runs), fewer sequences (the most that meet the ITL at ``tp``)."""
    tries = []
    if spec.kv_cache_dtype != "fp8":
        fp8 = spec.model_copy(update={"kv_cache_dtype": "fp8"})
        if any(_meets(fp8, t, limit, gpu)
               for t in _candidates(fp8, min(max_gpus, WORKER_MAX_TENSOR_PARALLEL))):
            tries.append("kvCacheDtype fp8")
    larger = [t for t in TP_DEGREES if tp < t <= min(max_gpus, WORKER_MAX_TENSOR_PARALLEL)
              and tp_is_valid(spec, t) and _meets(spec, t, limit, gpu)]
    if larger:
        tries.append(f"tensorParallel {larger[0]}")
    if spec.sla.inter_token_latency_milliseconds is not None and gpu.hbm_bandwidth:
        budget = itl_step_bytes(spec, tp, gpu)
        per_sequence = decode_step_bytes(spec, tp, 1) - decode_step_bytes(spec, tp, 0)
        sequences = (budget - decode_step_bytes(spec, tp, 0)) // per_sequence
        if 1 <= sequences < spec.sla.concurrent_sequences:
            fewer = spec.model_copy(update={"sla": spec.sla.model_copy(
                update={"concurrent_sequences": sequences})})
            if _latency_problem(fewer, tp, gpu) is None:
                tries.append(f"concurrentSequences <= {sequences}")
    return tries


def requirement(spec: ModelSpec, gpu_hbm: int, max_gpus: int, reserve: float = 0.0,
                gpu: Optional[GPUProduct] = None) -> Requirement | str:
    """What one replica needs on GPUs of ``gpu_hbm`` bytes, or why it cannot fit there.

    TP auto picks the smallest degree whose per-GPU budget fits this product and, when
    ``gpu`` gives the product's facts, at which the replica alone meets its latency
    targets (its decode step within the ITL, its prefill within the TTFT): a model may
    run at TP 1 on H200 and TP 2 on H100, or at TP 2 where TP 1 would decode too slowly.
    """
    limit = usable_hbm(gpu_hbm, reserve)
    candidates = _candidates(spec, max_gpus)
    for tp in candidates:
        if _meets(spec, tp, limit, gpu):
            b = replica_budget(spec, tp)
            return Requirement(
                tp, b.per_gpu, b.kv_cache // b.kv_bytes_per_token,
                step_bytes=decode_step_bytes(spec, tp),
                step_budget=None if gpu is None else itl_step_bytes(spec, tp, gpu),
                kv_bytes_per_token=b.kv_bytes_per_token,
            )
    fitting = [t for t in candidates if replica_budget(spec, t).per_gpu <= limit]
    if fitting and gpu is not None:
        tp = fitting[0]
        why = _latency_problem(spec, tp, gpu)
        fixes = [] if "unknown" in why else _latency_fixes(spec, tp, limit, max_gpus, gpu)
        if not fixes:
            return f"{why}; no tensorParallel up to {max_gpus} meets it on this product"
        return f"{why}; try {', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}"
    usable = format_bytes(limit)
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
               replicas: int | None = None, spread: str | None = None) -> Demand:
    """One model's demand over the products of ``snapshot``, spread as the Model's
    ``placement.spread`` says (``spread``, when given, instead)."""
    reqs: dict[str, Requirement] = {}
    unfit: dict[str, str] = {}
    for product, (hbm, gpus, facts) in sorted(gpu_kinds(snapshot).items()):
        if spec.gpu_products and product not in spec.gpu_products:
            continue
        r = requirement(spec, hbm, gpus, policy.reserve, facts)
        if isinstance(r, Requirement):
            reqs[product] = r
        else:
            unfit[product] = r
    return Demand(
        model=name, replicas=spec.replicas if replicas is None else replicas,
        requirements=reqs, products=tuple(spec.gpu_products), unfit=unfit, spec=spec,
        spread=spec.spread if spread is None else spread,
    )


def servable(d: Demand, spec: ModelSpec) -> Demand:
    """The demand without the products where ``tensorParallel: auto`` resolves to a
    degree kvpilot's worker cannot run; their reason says so. The operator plans with
    this, so ``kvpilot plan`` does too."""
    wide = {p: why for p, r in d.requirements.items()
            if (why := worker_support_problem(spec, r.tp))}
    if not wide:
        return d
    return replace(d, requirements={p: r for p, r in d.requirements.items() if p not in wide},
                   unfit={**d.unfit, **wide})


@dataclass(frozen=True)
class Refused:
    """A Model the operator starts no worker for (``kvpilot.api.support``)."""

    reason: str
    replicas: int  # what it asks


def demands_from_models(models: Sequence[Model], snapshot: Snapshot, policy: Policy,
                        worker_limits: bool = True, spread: str | None = None,
                        ) -> tuple[list[Demand], dict[str, Refused]]:
    """Demands of Model objects, in their order, as the operator makes them; a name may
    appear once. The second result: the Models the operator would refuse, by name; they
    are not demanded. Without ``worker_limits``, every Model is planned as placement
    alone allows (for capacity planning with another engine). ``spread``, when given,
    stands for every Model's ``placement.spread`` (what if they all spread so)."""
    seen: set[str] = set()
    out, refused = [], {}
    for m in models:
        name = m.metadata.name
        if name in seen:
            raise ValueError(f"model {name!r} appears twice")
        seen.add(name)
        if not worker_limits:
            out.append(demand_for(name, m.spec, snapshot, policy, spread=spread))
        elif problem := worker_support_problem(m.spec):
            refused[name] = Refused(problem, m.spec.desired_replicas)
        else:
            out.append(servable(demand_for(name, m.spec, snapshot, policy, spread=spread),
                                m.spec))
    return out, refused
