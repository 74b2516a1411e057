"""Build an engine from worker settings: load the checkpoint, size the page pool, set up
the block manager, scheduler, model runner and stats."""

from __future__ import annotations

import logging

import torch

from kvpilot.worker.block_manager import BlockManager
from kvpilot.worker.config import WorkerSettings, size_pool
from kvpilot.worker.engine import Engine
from kvpilot.worker.model import Llama, LlamaConfig, load_config, load_weights
from kvpilot.worker.runner import ModelRunner
from kvpilot.worker.scheduler import Scheduler
from kvpilot.worker.stats import EngineStats
from kvpilot.worker.tokenizer import Tokenizer

log = logging.getLogger("kvpilot.worker")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def create_engine(s: WorkerSettings, *, cfg: LlamaConfig | None = None,
                  model: Llama | None = None, tokenizer: Tokenizer | None = None) -> Engine:
    """An engine for ``s``; ``model`` (with its ``cfg``) replaces loading the checkpoint."""
    device = torch.device(s.device)
    if model is None:
        cfg = load_config(s.model_dir)
        weights = load_weights(s.model_dir, cfg, device, DTYPES[s.dtype])
        model = Llama(cfg, weights, max_positions=s.max_model_len)
        tokenizer = Tokenizer(s.model_dir)
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
    if s.tp != 1:
        log.warning("tensorParallel %d: this engine runs a replica on one device; the pool "
                    "is sized with the per-GPU budget of TP %d", s.tp, s.tp)
    gpu_hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    pool = size_pool(s.spec, page_size=s.page_size, tp=s.tp, hbm_per_gpu=s.hbm_per_gpu,
                     gpu_hbm=gpu_hbm, gpu_memory_utilization=s.gpu_memory_utilization)
    bm = BlockManager(pool.num_pages, s.page_size, prefix_caching=s.prefix_caching)
    runner = ModelRunner(model, bm, kv_dtype=s.kv_dtype, max_model_len=s.max_model_len,
                         max_num_seqs=s.max_num_seqs,
                         cuda_graphs=s.cuda_graphs and device.type == "cuda",
                         debug_checks=s.debug_checks)
    # Preempted sequences re-enter the waiting queue over its bound: leave them room.
    scheduler = Scheduler(bm, max_num_seqs=s.max_num_seqs,
                          max_batched_tokens=max(s.max_batched_tokens, s.max_model_len),
                          max_waiting=s.max_waiting + s.max_num_seqs)
    stats = EngineStats(model=s.name, page_size=s.page_size,
                        kv_bytes_per_token=runner.kv_bytes_per_token,
                        pages_total=pool.num_pages, kv_budget_bytes=pool.budget_bytes)
    eos = set(cfg.eos_token_ids)
    tokenizer_eos = tokenizer.token_id(tokenizer.eos_token) if tokenizer is not None else None
    if tokenizer_eos is not None:
        eos.add(tokenizer_eos)
    log.info("KV cache: %d pages of %d tokens = %d tokens, %d bytes (%s); placement's KV "
             "budget %d bytes", pool.num_pages, s.page_size, pool.num_pages * s.page_size,
             runner.kv_capacity_bytes, pool.source, pool.budget_bytes)
    return Engine(runner, scheduler, tokenizer, stats, max_model_len=s.max_model_len,
                  eos_token_ids=eos, seed=s.seed)
