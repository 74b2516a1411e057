"""Build an engine from worker settings: load the checkpoint, size the page pool, set up
the block manager, scheduler, model runner and stats.

At ``tp`` > 1 this process is rank 0 of the replica: it starts the other ranks
(``kvpilot.worker.parallel``), loads its own shard, and runs the engine; the page pool
on every rank is the per-GPU budget of ``size_pool(spec, tp=tp, ...)``. The stats count
KV bytes over all ranks (each rank's pool has the same pages, each holding its own KV
heads: rank 0's bytes per token x tp), so capacity and usage are the replica's; the KV
budget stays the per-GPU one placement reserved, and the decode step's read bytes are
rank 0's GPU's (its weights shard and its KV heads).
"""

from __future__ import annotations

import logging

import torch

from kvpilot.worker.block_manager import BlockManager, KVGroups
from kvpilot.worker.config import WorkerSettings, size_pool
from kvpilot.worker.engine import Engine
from kvpilot.worker.model import DTYPES, Llama, LlamaConfig, Partition, load_config, load_weights
from kvpilot.worker.parallel import FailureHandler, RankSpec, start_replica
from kvpilot.worker.runner import ModelRunner, layer_groups, ring_pages
from kvpilot.worker.scheduler import Scheduler
from kvpilot.worker.stats import EngineStats
from kvpilot.worker.tokenizer import Tokenizer

log = logging.getLogger("kvpilot.worker")

def create_engine(s: WorkerSettings, *, cfg: LlamaConfig | None = None,
                  model: Llama | None = None, tokenizer: Tokenizer | None = None,
                  on_rank_failure: FailureHandler | None = None) -> Engine:
    """An engine for ``s``; ``model`` (with its ``cfg``) replaces loading the checkpoint
    (TP 1 only). ``on_rank_failure``: what rank 0 does when another rank of a
    tensor-parallel replica dies or hangs (the worker exits; by default it is only
    logged and every later step fails)."""
    tp = s.tp
    device = torch.device(s.device)
    if tp > 1:
        if model is not None:
            raise ValueError("a tensor-parallel engine loads its shards from the checkpoint")
        cfg = load_config(s.model_dir)
        Partition.of(cfg, 0, tp)  # a degree the checkpoint cannot be split by fails here
        tokenizer = Tokenizer(s.model_dir)
        if device.type == "cuda":
            device = torch.device("cuda", 0)
    elif model is None:
        cfg = load_config(s.model_dir)
        weights = load_weights(s.model_dir, cfg, device, DTYPES[s.dtype])
        model = Llama(cfg, weights, max_positions=s.max_model_len)
        tokenizer = Tokenizer(s.model_dir)
    if model is not None:
        cfg = model.cfg
    if s.max_model_len > cfg.max_position_embeddings:
        log.warning("context SLA %d exceeds the checkpoint's max_position_embeddings %d",
                    s.max_model_len, cfg.max_position_embeddings)
    arch = s.spec.architecture
    if (arch.layers, arch.kv_heads, arch.head_dim) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
        log.warning("the Model spec's architecture (%d layers, %d KV heads of %d) is not the "
                    "checkpoint's (%d, %d of %d): the pool holds the tokens the spec's budget "
                    "buys, at the checkpoint's bytes per token", arch.layers, arch.kv_heads,
                    arch.head_dim, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    gpu_hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    groups = layer_groups(cfg)
    ring = ring_pages(cfg, s.page_size, s.max_model_len)
    pool = size_pool(s.spec, page_size=s.page_size, tp=tp, hbm_per_gpu=s.hbm_per_gpu,
                     gpu_hbm=gpu_hbm, gpu_memory_utilization=s.gpu_memory_utilization,
                     ring_pages=ring, all_local=ring is not None and max(groups) == 0)
    rings = [None] * len(pool.group_pages)
    if ring is not None:
        rings[-1] = ring
    bm = KVGroups([BlockManager(n, s.page_size, prefix_caching=s.prefix_caching, ring_pages=r)
                   for n, r in zip(pool.group_pages, rings)])
    if tp > 1:
        spec = RankSpec(tp=tp, device=device.type, dtype=s.dtype, kv_dtype=s.kv_dtype,
                        page_size=s.page_size, num_pages=list(pool.group_pages),
                        max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
                        cuda_graphs=s.cuda_graphs, timeout_s=s.tp_timeout_s,
                        model_dir=s.model_dir)
        runner = start_replica(spec, bm, debug_checks=s.debug_checks, on_failure=on_rank_failure)
    else:
        runner = ModelRunner(model, bm, kv_dtype=s.kv_dtype, max_model_len=s.max_model_len,
                             max_num_seqs=s.max_num_seqs,
                             cuda_graphs=s.cuda_graphs and device.type == "cuda",
                             debug_checks=s.debug_checks)
    # Preempted sequences re-enter the waiting queue over its bound: leave them room.
    # Every running decode fits a step's budget; prompts are chunked to what is left.
    scheduler = Scheduler(bm, max_num_seqs=s.max_num_seqs,
                          max_batched_tokens=max(s.max_batched_tokens, s.max_num_seqs),
                          max_waiting=s.max_waiting + s.max_num_seqs)
    per_slot = runner.group_bytes_per_token
    stats = EngineStats(model=s.name, page_size=s.page_size,
                        kv_bytes_per_token=per_slot[0] * tp,
                        pages_total=pool.num_pages, kv_budget_bytes=pool.budget_bytes,
                        window_pages_total=sum(pool.group_pages[1:]),
                        window_bytes_per_token=sum(per_slot[1:]) * tp)
    eos = set(cfg.eos_token_ids)
    tokenizer_eos = tokenizer.token_id(tokenizer.eos_token) if tokenizer is not None else None
    if tokenizer_eos is not None:
        eos.add(tokenizer_eos)
    log.info("KV cache: %d pages of %d tokens = %d tokens%s, %d bytes per GPU x %d (%s); "
             "placement's KV budget %d bytes per GPU", pool.num_pages, s.page_size,
             pool.num_pages * s.page_size,
             "" if ring is None else (f"; sliding-window layers: rings of {ring} pages, "
                                      f"{pool.group_pages[-1]} pages"),
             runner.kv_capacity_bytes, tp, pool.source, pool.budget_bytes)
    return Engine(runner, scheduler, tokenizer, stats, max_model_len=s.max_model_len,
                  eos_token_ids=eos, seed=s.seed)
