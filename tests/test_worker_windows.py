"""Sliding-window layers keep only their window in the KV pool, to the page, as
``kvpilot.api.memory`` counts them: the pools of a Gemma-3-27B-shaped model sized by the
memory model and a 32K-token sequence in them; a tiny Gemma 3 engine decoding far past its
window without its local layers' pool growing (CPU)."""

from __future__ import annotations

import pytest

from kvpilot.api import memory
from kvpilot.api.checkpoint import architecture_from_config
from kvpilot.api.model import ModelSpec
from kvpilot.worker.block_manager import BlockManager, KVGroups

torch = pytest.importorskip("torch")
from kvpilot.worker.config import size_pool  # noqa: E402
from kvpilot.worker.model import LlamaConfig  # noqa: E402
from kvpilot.worker.runner import layer_groups, ring_pages  # noqa: E402

PAGE = 16
CONTEXT = 32768
# Gemma-3-27B's text config: 62 layers, five local (window 1024) to one global.
GEMMA3_27B = {
    "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376,
    "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
    "num_key_value_heads": 16, "head_dim": 128, "sliding_window": 1024,
    "sliding_window_pattern": 6, "max_position_embeddings": 131072,
    "query_pre_attn_scalar": 168, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}


def _spec(config: dict, concurrent: int) -> ModelSpec:
    return ModelSpec.model_validate({
        "weights": {"parameters": 27_000_000_000, "dtype": "bf16"},
        "architecture": architecture_from_config(config), "kvCacheDtype": "bf16",
        "sla": {"contextTokens": CONTEXT, "concurrentSequences": concurrent},
        "tensorParallel": 1})


def _pools(cfg: LlamaConfig, spec: ModelSpec) -> tuple[KVGroups, list[int]]:
    groups = layer_groups(cfg)
    ring = ring_pages(cfg, PAGE, CONTEXT)
    size = size_pool(spec, page_size=PAGE, ring_pages=ring, all_local=max(groups) == 0)
    rings = [None] * (len(size.group_pages) - 1) + [ring]
    pools = KVGroups([BlockManager(n, PAGE, ring_pages=r)
                      for n, r in zip(size.group_pages, rings)])
    # Bytes one token slot of each pool costs: its layers' K and V, bf16.
    per_layer = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return pools, [per_layer * groups.count(g) for g in range(len(pools.pools))]


def _held(pools: KVGroups, seq_id: int, slot_bytes: list[int]) -> int:
    return sum(len(p.table(seq_id)) * PAGE * b for p, b in zip(pools.pools, slot_bytes))


def test_a_32k_sequence_of_a_gemma3_27b_shape_holds_what_the_memory_model_counts():
    cfg = LlamaConfig.from_hf(GEMMA3_27B)
    spec = _spec(GEMMA3_27B, concurrent=4)
    assert sum(cfg.local_layers) == memory.local_layers(spec.architecture) == 52
    pools, slot_bytes = _pools(cfg, spec)
    assert [p.ring_pages for p in pools.pools] == [None, 1024 // PAGE]
    per_sequence = memory.kv_bytes_per_sequence(spec.architecture, "bf16", CONTEXT)
    for seq_id in range(4):  # the SLA's concurrent sequences fit, each exactly
        assert pools.allocate(seq_id, list(range(CONTEXT))) is not None
        assert _held(pools, seq_id, slot_bytes) == per_sequence
    assert not pools.can_allocate(list(range(CONTEXT)))  # and a fifth does not
    # The pools are the budget, give or take a page per pool.
    budget = memory.replica_budget(spec, 1).kv_cache
    total = sum(p.num_pages * PAGE * b for p, b in zip(pools.pools, slot_bytes))
    assert budget <= total <= budget + PAGE * sum(slot_bytes)
    # Growing past the window: the global layers take pages, the local ones none.
    pools.free(3)
    assert pools.allocate(3, list(range(CONTEXT - 2 * PAGE))) is not None
    assert len(pools.pools[1].table(3)) == 64
    assert pools.append(3, CONTEXT)
    assert len(pools.pools[1].table(3)) == 64
    assert len(pools.pools[0].table(3)) == CONTEXT // PAGE


def test_a_window_that_is_not_whole_pages_is_rounded_up_to_the_page():
    # Phi-3-mini-4k: every layer slides over 2047 tokens.
    phi3 = {"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "sliding_window": 2047,
            "max_position_embeddings": 4096}
    cfg = LlamaConfig.from_hf(phi3)
    spec = ModelSpec.model_validate({
        "weights": {"parameters": 3_800_000_000, "dtype": "bf16"},
        "architecture": architecture_from_config(phi3), "kvCacheDtype": "bf16",
        "sla": {"contextTokens": 4096, "concurrentSequences": 8}, "tensorParallel": 1})
    groups = layer_groups(cfg)
    assert groups == [0] * 32
    ring = ring_pages(cfg, PAGE, 4096)
    assert ring == 128  # 2047 tokens in 128 pages of 16
    size = size_pool(spec, page_size=PAGE, ring_pages=ring, all_local=True)
    assert size.group_pages == (8 * 128,)  # eight whole rings


def test_a_tiny_gemma3_decodes_far_past_its_window_in_a_fixed_ring(tmp_path):
    from tests.family_helpers import GREEDY, prompts, write_family_checkpoint
    from tests.worker_helpers import tiny_engine

    ckpt = write_family_checkpoint(tmp_path, "gemma3_text")
    engine = tiny_engine(ckpt)
    global_pool, ring_pool = engine.scheduler.bm.pools
    assert ring_pool.ring_pages == 1  # a window of 16 in pages of 16
    seq = engine.generate(prompts((40,)), GREEDY)[0]  # 40 + 32 tokens
    assert len(seq) == 72
    stats = engine.snapshot()
    assert stats.window_pages_total == ring_pool.num_pages
    # While it ran, its local layers held one page and its global ones five.
    engine.add(seq_two := type(seq)(list(prompts((40,))[0]), GREEDY))
    engine.step()
    assert len(ring_pool.table(seq_two.seq_id)) == 1
    assert len(global_pool.table(seq_two.seq_id)) == 3
    for _ in range(30):
        engine.step()
    assert len(ring_pool.table(seq_two.seq_id)) == 1
    assert len(global_pool.table(seq_two.seq_id)) == 5
    assert engine.snapshot().window_pages_used == 1
