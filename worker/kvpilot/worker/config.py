"""Worker settings, and the page pool sized by the memory model of ``kvpilot.api.memory``.

The operator hands a worker its Model through the environment (``kvpilot.api.contract``:
the spec as camelCase JSON, the Model's name, the HBM budget placement reserved per GPU,
the TP degree); ``--spec MODEL.yaml`` does the same by hand. The KV pool then holds
``kv_capacity_tokens(spec, tp, hbm_per_gpu)`` tokens: what placement reserved for KV,
the same formula the operator placed the replica with. Without a budget in the
environment it holds the SLA itself, ``contextTokens x concurrentSequences``. Standalone
on a GPU, ``--gpu-memory-utilization`` sizes it from the GPU's memory instead; without a
spec at all, the Model is described from the checkpoint's config with an SLA of
``--max-model-len`` x ``--concurrent-sequences``.

The Model's context SLA is the longest sequence the worker serves (prompt + output).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from kvpilot.api import contract
from kvpilot.api.memory import kv_capacity_tokens, replica_budget
from kvpilot.api.model import ModelSpec
from kvpilot.worker.model import LlamaConfig

log = logging.getLogger("kvpilot.worker")


@dataclass(frozen=True)
class PoolSize:
    num_pages: int  # of the first pool (kvpilot.worker.block_manager.KVGroups)
    capacity_tokens: int  # what the memory model grants (before rounding to pages)
    budget_bytes: int  # KV bytes placement reserved per GPU (0 when sized standalone)
    source: str  # how it was sized, for the log
    group_pages: tuple[int, ...] = ()  # pages of each KV group's pool, the first included


def spec_from_checkpoint(cfg: LlamaConfig, *, params_dtype: str, kv_dtype: str,
                         max_model_len: int, concurrent: int) -> ModelSpec:
    """A Model spec describing a checkpoint, for a worker started without one. A CPU
    worker's fp32 KV cache is described as bf16 (the spec knows no fp32 cache): the pool
    holds the same tokens, at the bytes per token of the cache actually allocated."""
    return ModelSpec.model_validate({
        "weights": {"parameters": cfg.num_parameters(), "dtype": params_dtype},
        "architecture": {
            "layers": cfg.num_layers, "attentionHeads": cfg.num_heads,
            "kvHeads": cfg.num_kv_heads, "headDim": cfg.head_dim,
            "maxContextTokens": max(max_model_len, cfg.max_position_embeddings),
        },
        "kvCacheDtype": "bf16" if kv_dtype == "fp32" else kv_dtype,
        "sla": {"contextTokens": max_model_len, "concurrentSequences": concurrent},
        "tensorParallel": 1,
    })


def spec_from_env(env: Mapping[str, str]) -> tuple[ModelSpec | None, str | None]:
    raw = env.get(contract.ENV_MODEL_SPEC)
    spec = ModelSpec.model_validate(json.loads(raw)) if raw else None
    return spec, env.get(contract.ENV_MODEL_NAME) or None


def tensor_parallel(spec: ModelSpec, env: Mapping[str, str]) -> int:
    raw = env.get(contract.ENV_TENSOR_PARALLEL)
    if raw:
        return int(raw)
    return 1 if spec.tensor_parallel == "auto" else int(spec.tensor_parallel)


def size_pool(spec: ModelSpec, *, page_size: int, tp: int = 1, hbm_per_gpu: int | None = None,
              gpu_hbm: int | None = None, gpu_memory_utilization: float | None = None,
              ring_pages: int | None = None, all_local: bool = False) -> PoolSize:
    """Pages of ``page_size`` tokens for the KV cache, by the memory model.

    ``hbm_per_gpu``: the budget placement reserved (the operator's env); else
    ``gpu_memory_utilization`` of ``gpu_hbm`` (standalone on a GPU); else the SLA.

    The memory model grants ``capacity_tokens`` tokens of sequences of the SLA's
    context: that many tokens on global layers, and a window on local ones for each
    of ``capacity_tokens / contextTokens`` sequences. A model with local layers
    (``ring_pages``: a sequence's ring) gets a pool of rings for them, after the global
    layers' pool, or as its only pool when ``all_local``."""
    budget = replica_budget(spec, tp)
    if hbm_per_gpu is not None:
        tokens = kv_capacity_tokens(spec, tp, hbm_per_gpu)
        source = f"the HBM budget placement reserved ({hbm_per_gpu} bytes per GPU)"
    elif gpu_memory_utilization is not None and gpu_hbm is not None:
        tokens = kv_capacity_tokens(spec, tp, gpu_hbm, 1.0 - gpu_memory_utilization)
        source = f"{gpu_memory_utilization:.0%} of the GPU's {gpu_hbm} bytes"
    else:
        tokens = budget.kv_cache // budget.kv_bytes_per_token
        source = "the context SLA (contextTokens x concurrentSequences)"
    if tokens <= 0:
        raise ValueError(f"no room for a KV cache: {source} is taken by weights and overhead")
    pages = (math.ceil(tokens / page_size),)
    if ring_pages is not None:
        # Whole rings for the sequences the budget buys (at least one).
        rings = max(ring_pages, math.ceil(tokens * ring_pages / spec.sla.context_tokens))
        pages = (rings,) if all_local else pages + (rings,)
    return PoolSize(pages[0], tokens, budget.kv_cache, source, pages)


@dataclass
class WorkerSettings:
    model_dir: str
    name: str
    spec: ModelSpec
    device: str = "cpu"
    dtype: str = "fp32"  # weights and activations: fp32 (CPU), bf16 or fp16
    kv_dtype: str = "fp32"  # fp32 (CPU only), bf16, fp16, fp8
    page_size: int = 16
    tp: int = 1  # ranks (GPUs) of the replica, one process each
    tp_timeout_s: float = 120.0  # a collective or step this long means a rank hangs
    hbm_per_gpu: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 64
    max_waiting: int = 256
    max_batched_tokens: int = 2048  # new tokens per step: decodes, then prefill chunks
    prefix_caching: bool = True
    cuda_graphs: bool = True
    debug_checks: bool = False
    seed: int = 0

    @property
    def max_model_len(self) -> int:
        return self.spec.sla.context_tokens


def env_hbm_per_gpu(env: Mapping[str, str]) -> int | None:
    raw = env.get(contract.ENV_HBM_PER_GPU)
    return int(raw) if raw else None
