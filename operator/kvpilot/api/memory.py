"""The memory model: what one replica of a Model needs in HBM, in one place.

The operator places replicas with these numbers and the worker sizes its KV block pool
with them, so a replica the planner thinks fits is one the engine can actually serve.

Per GPU, one replica at tensor-parallel degree ``tp`` needs::

    weights / tp                                     (weights are sharded evenly)
  + kv_bytes_per_sequence(tp, contextTokens) x concurrentSequences
  + runtimeOverhead                                  (CUDA context, activations, graphs)

A sequence of ``c`` tokens costs, per GPU, what each layer keeps of it::

    kv_bytes_per_sequence(tp, c) = per_layer_token(tp) x (global_layers x c
                                                          + local_layers x min(c, window))

- ``per_layer_token`` for ``attention: gqa`` is ``2 (K and V) x ceil(kvHeads / tp) x
  headDim x bytes(kvCacheDtype)``; for ``attention: mla`` it is ``(kvLoraRank +
  qkRopeHeadDim) x bytes``: one latent and one RoPE key per token, shared by all heads.
- Local (sliding-window) layers keep the last ``window`` tokens of a sequence; global
  layers keep all of them. Without ``slidingWindow`` every layer is global, and the
  formula is the plain ``2 x layers x kvHeads x headDim x bytes x c``.

Tensor parallelism splits a layer's KV by head. GQA heads are split, and when ``tp``
exceeds ``kvHeads`` every GPU keeps a full copy of one head (replicated, not split; vLLM's
``ModelConfig.get_num_kv_heads`` is ``max(1, kvHeads // tp)``). A local layer splits as a
global one does: its window bounds tokens, not heads (vLLM gives its ``SlidingWindowSpec``
and ``FullAttentionSpec`` the same per-GPU KV heads). The MLA latent belongs to every
head, so each GPU keeps all of it: TP shards an MLA model's weights, not its KV cache
(vLLM counts one KV head per GPU for MLA at any TP, "when using MLA during decode it
becomes MQA"; that copy on every GPU is why SGLang and vLLM offer data-parallel
attention for DeepSeek models). Pages are not counted: an engine rounds each layer's
tokens up to its page size.

The step-time model (the second half of this module) says how fast a replica decodes and
prefills on a GPU product. A decode step streams each GPU's weight shard and the KV cache
of every sequence it holds from HBM, so it is bandwidth-bound::

    decode_step_bytes   = weights / tp + kv_bytes_per_sequence(tp, contextTokens) x sequences
    decode_step_seconds = bytes / (bandwidth x BANDWIDTH_EFFICIENCY) + fixed per-step cost

GPUs that several replicas share time-slice: when all are busy, every step of one waits
for the others' kernels, so each tenant's step takes the bytes of ALL tenants of the GPU
over its bandwidth, plus its own fixed (host-side) cost. A prefill is compute-bound::

    prefill_seconds = (2 x parameters x prompt + 2 x layers x prompt^2 x heads x headDim)
                      / (tp x bf16 FLOP/s x PREFILL_EFFICIENCY)

The planner, the worker and the simulator all use these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvpilot.api.gpus import GPUProduct
from kvpilot.api.model import (
    MAX_TENSOR_PARALLEL, TENSOR_PARALLEL_DEGREES, Architecture, ModelSpec,
)
from kvpilot.api.quantity import parse_bytes

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5,
}
TP_DEGREES = TENSOR_PARALLEL_DEGREES


def kv_bytes_per_layer_token(arch: Architecture, kv_dtype: str, tp: int = 1) -> int:
    """KV-cache bytes one layer keeps for one token on each GPU of a replica: K and V of
    the GPU's share of KV heads, or (MLA) the whole latent and RoPE key."""
    width = DTYPE_BYTES[kv_dtype]
    if arch.mla is not None:
        return int((arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim) * width)
    return int(2 * math.ceil(arch.kv_heads / tp) * arch.head_dim * width)


def local_layers(arch: Architecture) -> int:
    """How many layers are local (sliding-window) ones: whole groups of the pattern,
    then the local layers a last, partial group starts with."""
    window = arch.sliding_window
    if window is None:
        return 0
    groups, rest = divmod(arch.layers, window.local_layers + window.global_layers)
    return groups * window.local_layers + min(rest, window.local_layers)


def kv_bytes_per_token(arch: Architecture, kv_dtype: str, tp: int = 1) -> int:
    """KV-cache bytes one token costs on each GPU of a replica while every layer keeps
    it (all layers; within every window). A local layer drops tokens older than its
    window, so a sequence costs ``kv_bytes_per_sequence``, not this times its length."""
    return arch.layers * kv_bytes_per_layer_token(arch, kv_dtype, tp)


def kv_bytes_per_sequence(arch: Architecture, kv_dtype: str, context_tokens: int,
                          tp: int = 1) -> int:
    """KV-cache bytes one sequence of ``context_tokens`` tokens holds on each GPU of a
    replica: global layers keep every token, local ones the last ``window``."""
    local = local_layers(arch)
    window = arch.sliding_window
    kept = min(context_tokens, window.tokens) if window is not None else context_tokens
    layer_tokens = (arch.layers - local) * context_tokens + local * kept
    return kv_bytes_per_layer_token(arch, kv_dtype, tp) * layer_tokens


def max_context_within(arch: Architecture, kv_dtype: str, bytes_per_sequence: int,
                       tp: int = 1) -> int:
    """The longest context, up to ``maxContextTokens``, whose sequence holds at most
    ``bytes_per_sequence`` of KV on each GPU (the inverse of ``kv_bytes_per_sequence``);
    0 when not even one token fits."""
    layer_tokens = max(0, bytes_per_sequence) // kv_bytes_per_layer_token(arch, kv_dtype, tp)
    context = layer_tokens // arch.layers
    local = local_layers(arch)
    window = arch.sliding_window
    if window is not None and local and context >= window.tokens:
        # Past the window only the global layers grow; with none, no context is too long.
        rest = arch.layers - local
        context = (arch.max_context_tokens if rest == 0
                   else (layer_tokens - local * window.tokens) // rest)
    return min(context, arch.max_context_tokens)


def naive_kv_bytes_per_sequence(arch: Architecture, kv_dtype: str, context_tokens: int) -> int:
    """What ``2 x layers x kvHeads x headDim x bytes x context`` says a sequence costs
    (one GPU): every layer keeping K and V of every head for every token, blind to
    windows and latents. Only for showing what the memory model saves against it."""
    return int(2 * arch.layers * arch.kv_heads * arch.head_dim * DTYPE_BYTES[kv_dtype]
               * context_tokens)


def weight_bytes(spec: ModelSpec) -> int:
    """Total weight bytes: the explicit size if given, else parameters x dtype width."""
    if spec.weights.bytes is not None:
        return parse_bytes(spec.weights.bytes)
    assert spec.weights.parameters is not None  # the API requires one of the two
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
    """HBM one replica needs on EACH of its ``tp`` GPUs, broken down.

    ``kv_bytes_per_sequence`` is what one sequence of the SLA's ``contextTokens`` holds;
    ``kv_bytes_per_token`` is that over ``contextTokens``, rounded down (so ``kv_cache``
    counts at least the SLA's tokens): the cost of a token in sequences of that length,
    which turns spare HBM into KV tokens. Where every layer keeps every token it is
    exactly ``kv_bytes_per_token(arch, dtype, tp)``.
    """

    tp: int
    weights: int
    kv_cache: int
    overhead: int
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int

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
    context = spec.sla.context_tokens
    per_sequence = kv_bytes_per_sequence(spec.architecture, spec.kv_cache_dtype, context, tp)
    return ReplicaBudget(
        tp=tp,
        weights=weight_bytes_per_gpu(spec, tp),
        kv_cache=per_sequence * spec.sla.concurrent_sequences,
        overhead=parse_bytes(spec.runtime_overhead),
        kv_bytes_per_token=max(1, per_sequence // context),
        kv_bytes_per_sequence=per_sequence,
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
    runtime overhead leave, counted in tokens of sequences of the SLA's context (see
    ``ReplicaBudget``). Zero when the weights alone do not fit.
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


# --- step-time model -------------------------------------------------------------------

BANDWIDTH_EFFICIENCY = 0.85
"""Fraction of the datasheet HBM bandwidth a decode step streams at. A plain read reaches
93.5-95% of the datasheet on an H100 and an H200 (3135 of 3350 GB/s, 4560 of 4800), and
the project's decode kernel 90-96% of that read ceiling (docs/worker.md): 0.84-0.91."""

PREFILL_EFFICIENCY = 0.5
"""Fraction of the datasheet dense bf16 FLOP/s a prefill reaches (model FLOP utilization
of long prefills in current engines is 0.4-0.7)."""

DECODE_STEP_FIXED_SECONDS = 0.002
"""What one decode step costs besides streaming bytes: scheduling, sampling, the CUDA-graph
launch, postprocessing. Host-side, so tenants of a shared GPU do not add up theirs."""

ALLREDUCE_SECONDS = 10e-6
"""Latency of one small all-reduce over NVLink; a TP > 1 decode step does two per layer."""


def parameter_count(spec: ModelSpec) -> int:
    """The parameters, as given, else the weight bytes over the dtype's width."""
    if spec.weights.parameters is not None:
        return spec.weights.parameters
    return math.ceil(weight_bytes(spec) / DTYPE_BYTES[spec.weights.dtype])


def decode_step_bytes(
    spec: ModelSpec, tp: int, sequences: int | None = None, context_tokens: int | None = None,
) -> int:
    """HBM bytes ONE GPU of a replica reads in one decode step: its weight shard and the
    KV cache of ``sequences`` sequences of ``context_tokens`` tokens each (by default the
    SLA's ``concurrentSequences`` and ``contextTokens``: the step at full load). A local
    layer reads only its window, and an MLA layer its latent (absorbed into the query)."""
    sequences = spec.sla.concurrent_sequences if sequences is None else sequences
    context_tokens = spec.sla.context_tokens if context_tokens is None else context_tokens
    per_sequence = kv_bytes_per_sequence(
        spec.architecture, spec.kv_cache_dtype, context_tokens, tp)
    return weight_bytes_per_gpu(spec, tp) + per_sequence * sequences


def decode_fixed_seconds(spec: ModelSpec, tp: int) -> float:
    """The per-step cost of a replica that does not depend on bytes: the engine's fixed
    cost, plus two all-reduces per layer when its layers are split over ``tp`` > 1 GPUs."""
    allreduces = 2 * spec.architecture.layers if tp > 1 else 0
    return DECODE_STEP_FIXED_SECONDS + allreduces * ALLREDUCE_SECONDS


def effective_bandwidth(product: GPUProduct, efficiency: float = BANDWIDTH_EFFICIENCY) -> float:
    """Bytes/s a decode step streams at on ``product``; ValueError when its bandwidth is
    unknown (neither the catalog nor the node states it)."""
    if product.hbm_bandwidth is None:
        raise ValueError(f"HBM bandwidth of {product.name} is unknown")
    return product.hbm_bandwidth * efficiency


def decode_step_seconds(
    step_bytes: int, product: GPUProduct, fixed_seconds: float = DECODE_STEP_FIXED_SECONDS,
    efficiency: float = BANDWIDTH_EFFICIENCY,
) -> float:
    """Seconds one decode step takes on a GPU of ``product`` that streams ``step_bytes``:
    a replica's own ``decode_step_bytes``, or on a shared GPU the sum over its tenants.
    ``fixed_seconds`` is the replica's ``decode_fixed_seconds``."""
    return step_bytes / effective_bandwidth(product, efficiency) + fixed_seconds


def step_bytes_within(
    seconds: float, product: GPUProduct, fixed_seconds: float = DECODE_STEP_FIXED_SECONDS,
    efficiency: float = BANDWIDTH_EFFICIENCY,
) -> int:
    """The most bytes a GPU of ``product`` may stream per decode step so that the step
    takes at most ``seconds`` (the inverse of ``decode_step_seconds``, rounded down);
    negative when the fixed cost alone takes longer. The planner compares integer bytes
    against this, so the two never disagree at the boundary."""
    return math.floor((seconds - fixed_seconds) * effective_bandwidth(product, efficiency))


def itl_step_bytes(spec: ModelSpec, tp: int, product: GPUProduct) -> int | None:
    """The byte budget of one decode step on each GPU of a replica at ``tp`` on
    ``product`` under its ITL target (the bytes of all tenants of the GPU must fit in
    it); None when the Model sets no ``interTokenLatencyMilliseconds``."""
    itl = spec.sla.inter_token_latency_milliseconds
    if itl is None:
        return None
    return step_bytes_within(itl / 1000, product, decode_fixed_seconds(spec, tp))


def prefill_flops(spec: ModelSpec, prompt_tokens: int) -> int:
    """FLOPs of one prefill of ``prompt_tokens``: 2 per parameter per token for the
    matrix products, plus causal attention (QK^T and PV over half the square)."""
    arch = spec.architecture
    attention = 2 * arch.layers * prompt_tokens**2 * arch.attention_heads * arch.head_dim
    return 2 * parameter_count(spec) * prompt_tokens + attention


def prefill_seconds(
    spec: ModelSpec, tp: int, product: GPUProduct, prompt_tokens: int | None = None,
    efficiency: float = PREFILL_EFFICIENCY,
) -> float:
    """Seconds to prefill one prompt of ``prompt_tokens`` (by default ``contextTokens``:
    a prompt that fills the context, the SLA's worst case) on ``tp`` GPUs of ``product``,
    the estimate a TTFT target is checked against. ValueError when the product's FLOP/s
    are unknown."""
    if product.bf16_flops is None:
        raise ValueError(f"bf16 FLOP/s of {product.name} are unknown")
    prompt = spec.sla.context_tokens if prompt_tokens is None else prompt_tokens
    return prefill_flops(spec, prompt) / (tp * product.bf16_flops * efficiency)
