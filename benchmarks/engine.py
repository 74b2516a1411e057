"""The engine's decode speed on a Llama-3-8B-shaped model, against the read ceiling and
against Hugging Face transformers on the same weights, same run.

    python benchmarks/engine.py [--json OUT.json]        # needs a CUDA GPU (about 60 GiB)

Random bf16 weights in Llama-3-8B's shapes (32 layers, hidden 4096, 32 query and 8 KV
heads of 128, MLP 14336, vocabulary 128256, Llama-3 rope scaling).

1. Read ceiling: the best plain read of 4 GiB (``benchmarks/decode_kernel.py``).
2. 4K context, batch 1, 32 and 64: every sequence gets a random 4096-token prompt,
   prefilled by the engine itself; then ``--steps`` decode steps of the engine
   (``Engine.step``: scheduling, CUDA-graph replay, sampling, postprocessing) are timed
   with the wall clock. Tokens/s = batch x steps / time; bytes read per step = weights
   read (all but the embedding table) + the KV of every sequence at its length in that
   step; achieved bandwidth = bytes / time, reported against the ceiling.
3. transformers' ``LlamaForCausalLM`` (bf16, SDPA attention, default ``generate()``
   greedy) with the same weights and prompts: a decode step's time is
   ``(time of generate(N + 1 new tokens) - time of generate(1 new token)) / N``,
   prefill cancelling out.
4. FP8 KV against bf16 KV at 32K context, batch 16, same weights: there the pages are
   filled with random values instead of prefilled (a decode step reads all of them
   either way, and 16 prefills of 32K tokens would only add minutes).
5. ``--tensor-parallel 1,2,4,8``: each degree above 1 runs step 2 again on that many
   GPUs (``kvpilot.worker.parallel``: this process is rank 0, one process per further
   GPU, each with random weights of its shard; NCCL, CUDA graphs with the all-reduces
   inside). Reported per batch: the decode step time (wall clock, as in 2), the bytes
   one GPU reads per step (its weight shard and its KV heads) and its GB/s, and the
   time of one step's collectives alone (2 all-reduces per layer and one for the
   embedding of ``[batch, hidden]``, and the all-gather of the logits, captured in one
   CUDA graph and replayed: ``ModelRunner.probe_collectives``). Steps 1, 3 and 4 run at
   TP 1 only, and TP 1 runs only when listed (it is the default).
6. ``--compare-shapes qwen2.5-7b,gemma-2-9b``: step 2 again on other families' shapes
   (their switches from their config.json; Gemma-2-9B's local layers read their window
   only, which the bytes per step count), as a share of the read ceiling against the
   main shape's. An 80 GB GPU does not hold 16 x 32K of bf16 KV beside the 8B weights:
   step 4 then runs the largest batch that fits, and says so; transformers at a batch
   that runs out of memory is skipped with a note.

Everything is printed with the GPU's name, and each baseline next to the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT / "operator"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from decode_kernel import read_ceiling  # noqa: E402
from kvpilot.worker.block_manager import BlockManager, KVGroups  # noqa: E402
from kvpilot.worker.engine import Engine, _Request  # noqa: E402
from kvpilot.worker.model import Llama, LlamaConfig, hf_state_dict, random_weights  # noqa: E402
from kvpilot.worker.parallel import RankSpec, start_replica  # noqa: E402
from kvpilot.worker.runner import ModelRunner, layer_groups, ring_pages  # noqa: E402
from kvpilot.worker.scheduler import SamplingParams, Scheduler, Sequence, Status  # noqa: E402
from kvpilot.worker.stats import EngineStats  # noqa: E402

LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, eos_token_ids=(128001,),
)
LLAMA3_70B = LlamaConfig(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
    num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(LLAMA3_8B.rope_scaling), max_position_embeddings=131072,
    eos_token_ids=(128001,),
)
# Other families' shapes, from their config.json (family switches included): q/k/v
# biases and 4 KV heads (Qwen2.5-7B); heads of 256, local and global layers with a 4K
# window, soft-capping and GeGLU (Gemma-2-9B).
QWEN25_7B = LlamaConfig.from_hf({
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 28, "tie_word_embeddings": False, "eos_token_id": 151645})
GEMMA2_9B = LlamaConfig.from_hf({
    "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584,
    "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 4096,
    "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "eos_token_id": 1})
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "qwen2.5-7b": QWEN25_7B, "gemma-2-9b": GEMMA2_9B}
NAMES = {"8b": "Llama-3-8B", "70b": "Llama-3.1-70B", "qwen2.5-7b": "Qwen2.5-7B",
         "gemma-2-9b": "Gemma-2-9B"}
PAGE = 16


def pools(cfg: LlamaConfig, pool_tokens: int, max_num_seqs: int, max_model_len: int) -> KVGroups:
    """A pool of ``pool_tokens`` tokens for the global layers and, with local layers, a
    ring per sequence for them (as the worker sizes them)."""
    ring = ring_pages(cfg, PAGE, max_model_len)
    sizes = [(-(-pool_tokens // PAGE), None)]
    if ring is not None:
        rings = (ring * max_num_seqs, ring)
        sizes = [rings] if max(layer_groups(cfg)) == 0 else sizes + [rings]
    return KVGroups([BlockManager(n, PAGE, ring_pages=r) for n, r in sizes])


def kv_read_bytes(engine: Engine, seqs: list[Sequence]) -> int:
    """KV bytes a decode step reads: every layer's tokens of every sequence, a local
    layer's up to its window."""
    cfg = engine.runner.model.cfg
    per_layer = engine.runner.kv_bytes_per_token // cfg.num_layers
    windows = [cfg.window_of(i) for i in range(cfg.num_layers)]
    return per_layer * sum(len(s) if w is None else min(len(s), w) for s in seqs for w in windows)


def log(*a):
    print(*a, flush=True)


def make_engine(model: Llama, *, kv_dtype: str, max_model_len: int, max_num_seqs: int,
                pool_tokens: int) -> Engine:
    bm = pools(model.cfg, pool_tokens, max_num_seqs, max_model_len)
    runner = ModelRunner(model, bm, kv_dtype=kv_dtype, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_batched_tokens=16384,
                      max_waiting=1024)
    stats = EngineStats("bench", PAGE, runner.kv_bytes_per_token, bm.num_pages, 0)
    return Engine(runner, sched, None, stats, max_model_len=max_model_len, eos_token_ids=set())


def make_tp_engine(cfg: LlamaConfig, tp: int, *, kv_dtype: str, max_model_len: int,
                   max_num_seqs: int, pool_tokens: int) -> Engine:
    """Rank 0 of a replica on ``tp`` GPUs, random weights; the engine runs here."""
    bm = pools(cfg, pool_tokens, max_num_seqs, max_model_len)
    spec = RankSpec(tp=tp, device="cuda", dtype="bf16", kv_dtype=kv_dtype, page_size=PAGE,
                    num_pages=[p.num_pages for p in bm.pools], max_model_len=max_model_len,
                    max_num_seqs=max_num_seqs, random_config=cfg)
    runner = start_replica(spec, bm)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_batched_tokens=16384,
                      max_waiting=1024)
    stats = EngineStats("bench", PAGE, runner.kv_bytes_per_token * tp, bm.num_pages, 0)
    return Engine(runner, sched, None, stats, max_model_len=max_model_len, eos_token_ids=set())


def timed_decode(engine: Engine, seqs: list[Sequence], steps: int) -> dict:
    """Time ``steps`` engine steps once every sequence is running (one token each)."""
    while engine.scheduler.waiting:  # prefill
        engine.step()
    assert all(s.status is Status.RUNNING for s in seqs)
    engine.step()  # one decode step untimed
    weights = engine.weight_read_bytes
    total_bytes = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        total_bytes += weights + kv_read_bytes(engine, seqs)
        outs = engine.step()
        assert len(outs) == len(seqs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for s in seqs:
        engine.abort(s.seq_id)
    return {"step_ms": elapsed / steps * 1e3, "tokens_per_s": len(seqs) * steps / elapsed,
            "gb_per_s": total_bytes / elapsed / 1e9, "bytes_per_step": total_bytes / steps}


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128000, (batch, length), generator=g).tolist()


def bench_engine_4k(model, batches, context, steps, *, cfg: LlamaConfig | None = None,
                    tp: int = 1) -> dict:
    """Step 2; at ``tp`` > 1 on a replica of shape ``cfg`` over that many GPUs, with each
    batch's collectives timed alone (``collectives_ms``)."""
    kw = dict(kv_dtype="bf16", max_model_len=context + steps + 16, max_num_seqs=max(batches),
              pool_tokens=max(batches) * (context + steps + 16))
    engine = make_engine(model, **kw) if tp == 1 else make_tp_engine(cfg, tp, **kw)
    out = {}
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for b in batches:
        seqs = [Sequence(p, params, arrival=time.monotonic())
                for p in random_prompts(b, context, seed=b)]
        for s in seqs:
            engine.add(s, detokenize=False)
        t0 = time.perf_counter()
        out[b] = timed_decode(engine, seqs, steps)
        out[b]["wall_s"] = time.perf_counter() - t0
        engine.scheduler.bm.reset_prefix_cache()
        line = (f"  kvpilot  batch {b:3d}: {out[b]['step_ms']:7.2f} ms/step "
                f"{out[b]['tokens_per_s']:9.1f} tok/s {out[b]['gb_per_s']:7.0f} GB/s")
        if tp > 1:
            out[b]["collectives_ms"] = engine.runner.probe_collectives(b) * 1e3
            line += f" per GPU at TP {tp}, collectives {out[b]['collectives_ms']:6.3f} ms/step"
        log(line)
    engine.runner.close()
    del engine
    torch.cuda.empty_cache()
    return out


def bench_transformers(cfg: LlamaConfig, weights, batches, context, steps) -> dict:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling), max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=128001, attn_implementation="sdpa")
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    missing = hf.load_state_dict(hf_state_dict(cfg, weights), strict=False)
    assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys)
    out = {}
    for b in batches:
        ids = torch.tensor(random_prompts(b, context, seed=b), device="cuda")

        def gen(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                r = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            assert r.shape[1] == context + n
            return time.perf_counter() - t0

        try:
            gen(2)  # warm-up
            t1 = gen(1)
            tn = gen(steps + 1)
        except torch.cuda.OutOfMemoryError:
            log(f"  transformers batch {b:3d}: out of memory on this GPU, skipped")
            del ids
            gc.collect()
            torch.cuda.empty_cache()
            continue
        step = (tn - t1) / steps
        out[b] = {"step_ms": step * 1e3, "tokens_per_s": b / step}
        log(f"  transformers batch {b:3d}: {out[b]['step_ms']:7.2f} ms/step "
            f"{out[b]['tokens_per_s']:9.1f} tok/s")
        torch.cuda.empty_cache()
    hf = None  # free the GPU memory before the next part
    gc.collect()
    torch.cuda.empty_cache()
    return out


def fill_pages(engine: Engine) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in engine.runner.layers:
        for t in (layer.key, layer.value):
            for i in range(0, t.shape[0], 4096):
                chunk = t[i:i + 4096]
                chunk.copy_((torch.randn(chunk.shape, generator=g, device="cuda") * 0.5).to(t.dtype))


def long_batch_that_fits(model, batch: int, context: int) -> int:
    """The batch (at most ``batch``) whose bf16 KV at ``context`` fits in 90% of the free
    memory (an 80 GB GPU holds 8B weights and 14 x 32K, not 16)."""
    free, _ = torch.cuda.mem_get_info()
    per_sequence = context * model.cfg.num_layers * 2 * model.cfg.num_kv_heads * model.cfg.head_dim * 2
    return max(1, min(batch, int(0.9 * free) // per_sequence))


def bench_long(model, kv_dtype: str, batch: int, context: int, steps: int) -> dict:
    engine = make_engine(model, kv_dtype=kv_dtype, max_model_len=context + steps + 16,
                         max_num_seqs=batch, pool_tokens=batch * (context + steps + 16))
    fill_pages(engine)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    seqs = []
    for p in random_prompts(batch, context, seed=100):
        s = Sequence(p, params)
        # The context is already in the (random) pages: only its last token is computed.
        assert engine.scheduler.bm.allocate(s.seq_id, s.tokens) is not None
        s.num_computed, s.status = context - 1, Status.RUNNING
        engine.scheduler.running.append(s)
        engine._requests[s.seq_id] = _Request(s, None)
        seqs.append(s)
    r = timed_decode(engine, seqs, steps)
    log(f"  kvpilot {kv_dtype:4s} KV, batch {batch}, {context // 1024}K: {r['step_ms']:7.2f} "
        f"ms/step {r['tokens_per_s']:8.1f} tok/s {r['gb_per_s']:7.0f} GB/s")
    del engine
    torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--hf-steps", type=int, default=32)
    ap.add_argument("--batches", default="1,32,64")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--long-context", type=int, default=32768)
    ap.add_argument("--long-batch", type=int, default=16)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--tensor-parallel", default="1",
                    help="degrees to run step 2 at, e.g. 1,2,4,8 (TP 1 also runs 1, 3, 4)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                    help="model shape (70b needs TP >= 4 on 80 GB GPUs)")
    ap.add_argument("--compare-shapes", default="",
                    help="more shapes to run step 2 on at TP 1, e.g. qwen2.5-7b,gemma-2-9b: "
                         "their share of the read ceiling against --shape's")
    ap.add_argument("--json")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    degrees = [int(t) for t in a.tensor_parallel.split(",")]
    gpu = torch.cuda.get_device_name()
    log(f"GPU: {gpu} x {torch.cuda.device_count()} visible; torch {torch.__version__}")
    ceiling = read_ceiling(log)
    log(f"read ceiling: {ceiling:.0f} GB/s")

    cfg = SHAPES[a.shape]
    tp_results = {}
    for tp in [t for t in degrees if t > 1]:
        log(f"TP {tp}: {NAMES[a.shape]} shape, random bf16 weights, {a.context // 1024}K context")
        tp_results[tp] = bench_engine_4k(None, batches, a.context, a.steps, cfg=cfg, tp=tp)
    if tp_results:
        log(f"\n{gpu}, {NAMES[a.shape]} shape, {a.context // 1024}K context, tensor parallel")
        log("TP | batch | ms/step  tok/s  GB/s per GPU | collectives ms/step  of step")
        for tp, rows in tp_results.items():
            for b, o in rows.items():
                log(f"{tp:2d} | {b:5d} | {o['step_ms']:7.2f} {o['tokens_per_s']:6.0f} "
                    f"{o['gb_per_s']:13.0f} | {o['collectives_ms']:19.3f} "
                    f"{o['collectives_ms'] / o['step_ms']:7.0%}")
    if 1 not in degrees:
        if a.json:
            Path(a.json).write_text(json.dumps({
                "gpu": gpu, "torch": torch.__version__, "ceiling_gb_per_s": ceiling,
                "shape": a.shape, "tensor_parallel": tp_results}, indent=2))
        return

    weights = random_weights(cfg, "cuda", torch.bfloat16, seed=0)
    model = Llama(cfg, weights, max_positions=a.long_context + a.steps + 64)
    log(f"weights: {weights.nbytes() / 1e9:.2f} GB, read per decode step "
        f"{weights.read_per_step_bytes() / 1e9:.2f} GB")
    t0 = time.perf_counter()
    ours = bench_engine_4k(model, batches, a.context, a.steps)
    log(f"  (engine part took {time.perf_counter() - t0:.0f} s)")
    llama = cfg.model_type == "llama"
    if not llama:
        log("  transformers: compared on Llama shapes only")
    theirs = ({} if a.skip_transformers or not llama
              else bench_transformers(cfg, weights, batches, a.context, a.hf_steps))
    long_batch = long_batch_that_fits(model, a.long_batch, a.long_context + a.steps)
    if long_batch < a.long_batch:
        log(f"  FP8 vs bf16 KV: {a.long_batch} x {a.long_context // 1024}K bf16 does not fit "
            f"beside the weights on this GPU; batch {long_batch}")
    long = {k: bench_long(model, k, long_batch, a.long_context, a.steps // 2)
            for k in ("bf16", "fp8")}
    others = {}
    for name in [x for x in a.compare_shapes.split(",") if x and x != a.shape]:
        del model, weights
        gc.collect()
        torch.cuda.empty_cache()
        weights = random_weights(SHAPES[name], "cuda", torch.bfloat16, seed=0)
        model = Llama(SHAPES[name], weights, max_positions=a.context + a.steps + 64)
        log(f"{NAMES[name]} shape: weights {weights.nbytes() / 1e9:.2f} GB")
        others[name] = bench_engine_4k(model, batches, a.context, a.steps)

    log(f"\n{gpu}, {NAMES[a.shape]} shape, random bf16 weights, {a.context // 1024}K context, "
        f"read ceiling {ceiling:.0f} GB/s")
    log("batch | kvpilot ms/step  tok/s    GB/s  of ceiling | transformers ms/step  tok/s "
        " of ceiling | kvpilot / transformers")
    rows = []
    for b in batches:
        o = ours[b]
        line = (f"{b:5d} | {o['step_ms']:15.2f} {o['tokens_per_s']:7.0f} {o['gb_per_s']:7.0f} "
                f"{o['gb_per_s'] / ceiling:9.0%} |")
        row = {"batch": b, **o, "of_ceiling": o["gb_per_s"] / ceiling}
        if b in theirs:
            t = theirs[b]
            t_gbs = o["bytes_per_step"] / (t["step_ms"] / 1e3) / 1e9
            line += (f" {t['step_ms']:20.2f} {t['tokens_per_s']:6.0f} {t_gbs / ceiling:11.0%} |"
                     f" {o['tokens_per_s'] / t['tokens_per_s']:.2f} x")
            row["transformers"] = {**t, "of_ceiling": t_gbs / ceiling,
                                   "speedup": o["tokens_per_s"] / t["tokens_per_s"]}
        log(line)
        rows.append(row)
    if others:
        log(f"\nOther families' shapes against {NAMES[a.shape]}'s, same GPU, random bf16 "
            f"weights, {a.context // 1024}K context, share of the read ceiling")
        log("shape        | batch | ms/step  tok/s | of ceiling | vs " + NAMES[a.shape])
        for name, res in others.items():
            for b in batches:
                o, base = res[b], ours[b]["gb_per_s"] / ceiling
                share = o["gb_per_s"] / ceiling
                log(f"{NAMES[name]:12s} | {b:5d} | {o['step_ms']:7.2f} {o['tokens_per_s']:6.0f} "
                    f"| {share:10.1%} | {100 * (share - base):+5.1f} points")
    ratio = long["fp8"]["tokens_per_s"] / long["bf16"]["tokens_per_s"]
    log(f"FP8 KV vs bf16 KV, batch {long_batch}, {a.long_context // 1024}K context: "
        f"{long['fp8']['tokens_per_s']:.0f} vs {long['bf16']['tokens_per_s']:.0f} tok/s "
        f"= {ratio:.2f} x (bf16 {long['bf16']['gb_per_s'] / ceiling:.0%} of ceiling)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "gpu": gpu, "torch": torch.__version__, "ceiling_gb_per_s": ceiling, "rows": rows,
            "long": long, "long_batch": long_batch, "fp8_over_bf16": ratio, "shape": a.shape,
            "other_shapes": others,
            "tensor_parallel": tp_results}, indent=2))


if __name__ == "__main__":
    main()
