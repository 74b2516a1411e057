"""The memory model: what one replica of a Model needs in HBM, in one place.

The operator places replicas with these numbers and the worker sizes its KV block pool
with them, so a replica the planner thinks fits is one the engine can actually serve.

Per GPU, one replica at tensor-parallel degree ``tp`` needs::

    weights / tp                                     (weights are sharded evenly)
  + kv_bytes_per_token(tp) x contextTokens x concurrentSequences
  + runtimeOverhead                                  (CUDA context, activations, graphs)

where ``kv_bytes_per_token(tp) = 2 (K and V) x layers x ceil(kvHeads / tp) x headDim x
bytes(kvCacheDtype)``: each GPU holds its share of KV heads, and when ``tp`` exceeds
``kvHeads`` every GPU keeps a full copy of one head (the heads are replicated, not split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvpilot.api.model import (
    MAX_TENSOR_PARALLEL, TENSOR_PARALLEL_DEGREES, Architecture, ModelSpec,
)
from kvpilot.api.quantity import parse_bytes

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5,
}
TP_DEGREES = TENSOR_PARALLEL_DEGREES


def kv_bytes_per_token(arch: Architecture, kv_dtype: str, tp: int = 1) -> int:
    """KV-cache bytes one token costs on each GPU of a replica (all layers, K and V)."""
    heads_per_gpu = math.ceil(arch.kv_heads / tp)
    return int(2 * arch.layers * heads_per_gpu * arch.head_dim * DTYPE_BYTES[kv_dtype])


def weight_bytes(spec: ModelSpec) -> int:
    """Total weight bytes: the explicit size if given, else parameters x dtype width."""
    if spec.weights.bytes is not None:
        return parse_bytes(spec.weights.bytes)
    return math.ceil(spec.weights.parameters * DTYPE_BYTES[spec.weights.dtype])


def weight_bytes_per_gpu(spec: ModelSpec, tp: int) -> int:
    return math.ceil(weight_bytes(spec) / tp)


def tp_is_valid(spec: ModelSpec, tp: int) -> bool:
    """A TP degree must split the query heads evenly, and split the KV heads evenly or
    replicate them evenly."""
    kv = spec.architecture.kv_heads
    return spec.architecture.attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


@dataclass(frozen=True)
class ReplicaBudget:
    """HBM one replica needs on EACH of its ``tp`` GPUs, broken down."""

    tp: int
    weights: int
    kv_cache: int
    overhead: int
    kv_bytes_per_token: int

    @property
    def per_gpu(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def total(self) -> int:
        return self.per_gpu * self.tp


def replica_budget(spec: ModelSpec, tp: int) -> ReplicaBudget:
    """Per-GPU HBM of one replica serving its full SLA at TP degree ``tp``."""
    if not tp_is_valid(spec, tp):
        raise ValueError(
            f"tensorParallel {tp} does not divide attentionHeads "
            f"{spec.architecture.attention_heads}, or neither divides nor is a multiple "
            f"of kvHeads {spec.architecture.kv_heads}"
        )
    per_token = kv_bytes_per_token(spec.architecture, spec.kv_cache_dtype, tp)
    return ReplicaBudget(
        tp=tp,
        weights=weight_bytes_per_gpu(spec, tp),
        kv_cache=per_token * spec.sla.context_tokens * spec.sla.concurrent_sequences,
        overhead=parse_bytes(spec.runtime_overhead),
        kv_bytes_per_token=per_token,
    )


def usable_hbm(gpu_hbm: int, reserve_fraction: float = 0.0) -> int:
    """HBM of one GPU left for replicas after a safety reserve."""
    if not 0.0 <= reserve_fraction < 1.0:
        raise ValueError(f"reserve fraction must be in [0, 1): {reserve_fraction}")
    return int(gpu_hbm * (1.0 - reserve_fraction))


def kv_capacity_tokens(
    spec: ModelSpec, tp: int, gpu_hbm: int, reserve_fraction: float = 0.0
) -> int:
    """KV tokens one replica can hold when it has whole GPUs of ``gpu_hbm`` bytes.

    This is what the worker's block pool gets: everything on the GPU that weights and the
    runtime overhead leave. Zero when the weights alone do not fit.
    """
    budget = replica_budget(spec, tp)
    free = usable_hbm(gpu_hbm, reserve_fraction) - budget.weights - budget.overhead
    return max(0, free // budget.kv_bytes_per_token)


def smallest_tp(
    spec: ModelSpec, gpu_hbm: int, max_gpus: int = MAX_TENSOR_PARALLEL,
    reserve_fraction: float = 0.0,
) -> int | None:
    """The fewest GPUs of ``gpu_hbm`` bytes whose per-GPU budget fits; None if none does.

    With ``tensorParallel`` fixed in the spec, that degree is the only candidate.
    """
    candidates = (
        (spec.tensor_parallel,) if spec.tensor_parallel != "auto" else TP_DEGREES
    )
    limit = usable_hbm(gpu_hbm, reserve_fraction)
    for tp in candidates:
        if tp > max_gpus or not tp_is_valid(spec, tp):
            continue
        if replica_budget(spec, tp).per_gpu <= limit:
            return tp
    return None
