"""Tensor parallelism on CPU over gloo: the partition of heads, channels and vocabulary;
greedy tokens at TP 2 and 4 equal to TP 1 and to transformers' LlamaForCausalLM, token
for token (KV heads split, and replicated where kvHeads < tp); and the worker as the
operator starts it: serving over HTTP, and failing fast when a rank dies or hangs."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvpilot.api import contract  # noqa: E402
from kvpilot.api.memory import kv_bytes_per_token  # noqa: E402
from kvpilot.api.model import ModelSpec  # noqa: E402
from kvpilot.worker.model import LlamaConfig, Partition, load_config, load_weights  # noqa: E402
from kvpilot.worker.scheduler import SamplingParams  # noqa: E402
from kvpilot.worker.tiny import write_tiny_checkpoint  # noqa: E402
from tests.conftest import llama_spec  # noqa: E402
from tests.worker_helpers import WorkerProcess, assert_greedy_matches, tiny_engine  # noqa: E402

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = (1, 15, 17, 40)  # around page boundaries (16)
TOL = 1e-4  # float32: rounding only (the all-reduces sum in another order)


def prompts(lengths=PROMPT_LENGTHS):
    return [[(7 * i + 3 * n) % 256 for i in range(n)] for n in lengths]


# ---- the partition -------------------------------------------------------------------
def _cfg(heads, kv, inter=128, vocab=261):
    return LlamaConfig(vocab_size=vocab, hidden_size=heads * 16, intermediate_size=inter,
                       num_layers=2, num_heads=heads, num_kv_heads=kv, head_dim=16)


@pytest.mark.parametrize("heads, kv", [(4, 2), (8, 4), (8, 8), (32, 8), (64, 8), (8, 1)])
@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_each_rank_holds_the_kv_heads_of_its_query_heads_as_the_memory_model_counts(heads, kv, tp):
    if heads % tp:
        with pytest.raises(ValueError, match="must divide"):
            Partition.of(_cfg(heads, kv), 0, tp)
        return
    group = heads // kv
    held = set()
    for rank in range(tp):
        p = Partition.of(_cfg(heads, kv), rank, tp)
        assert p.num_kv_heads == math.ceil(kv / tp)
        assert p.num_heads * tp == heads and p.head_start == rank * p.num_heads
        kv_heads = range(p.kv_head_start, p.kv_head_start + p.num_kv_heads)
        queries = range(p.head_start, p.head_start + p.num_heads)
        for q in queries:
            assert q // group in kv_heads  # every query head finds its KV head locally
        # ... and in the local order: local query head j reads local KV head j // group
        local_group = p.num_heads // p.num_kv_heads
        assert [q // group - p.kv_head_start for q in queries] == [
            j // local_group for j in range(p.num_heads)]
        held.update(kv_heads)
    assert held == set(range(kv))
    arch = ModelSpec.model_validate(llama_spec(architecture={
        "layers": 2, "attentionHeads": heads, "kvHeads": kv, "headDim": 16,
        "maxContextTokens": 8192})).architecture
    p = Partition.of(_cfg(heads, kv), 0, tp)
    # the bytes per token of one rank's pool (runner.ModelRunner) are the memory model's
    assert 2 * 2 * p.num_kv_heads * 16 * 2 == kv_bytes_per_token(arch, "bf16", tp)


def test_vocabulary_rows_cover_the_vocabulary_once_and_the_last_rank_is_padded():
    p = [Partition.of(_cfg(8, 4, vocab=261), r, 4) for r in range(4)]
    assert [(x.vocab_start, x.vocab_rows) for x in p] == [(0, 66), (66, 66), (132, 66), (198, 66)]
    with pytest.raises(ValueError, match="MLP"):
        Partition.of(_cfg(8, 4, inter=130), 0, 4)


def test_a_rank_reads_only_its_slices_and_they_add_up_to_the_model(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, seed=2, hidden=128, heads=8, kv_heads=4)
    cfg = load_config(ckpt)
    whole = load_weights(ckpt, cfg, "cpu", torch.float32)
    shards = [load_weights(ckpt, cfg, "cpu", torch.float32, Partition.of(cfg, r, 2))
              for r in (0, 1)]
    q, kv = cfg.q_size, cfg.kv_size
    for i in range(cfg.num_layers):
        w, a, b = whole.layers[i], shards[0].layers[i], shards[1].layers[i]
        pq, pkv = q // 2, kv // 2
        for lo, hi, plo, phi in ((0, q, 0, pq), (q, q + kv, pq, pq + pkv),
                                 (q + kv, q + 2 * kv, pq + pkv, pq + 2 * pkv)):
            torch.testing.assert_close(torch.cat([a.qkv[plo:phi], b.qkv[plo:phi]]), w.qkv[lo:hi])
        torch.testing.assert_close(torch.cat([a.o, b.o], dim=1), w.o)
        torch.testing.assert_close(torch.cat([a.down, b.down], dim=1), w.down)
        torch.testing.assert_close(a.input_norm, w.input_norm)
    vocab = torch.cat([shards[0].lm_head, shards[1].lm_head])
    torch.testing.assert_close(vocab[:cfg.vocab_size], whole.lm_head)
    assert not vocab[cfg.vocab_size:].any()  # 261 rows: the second rank's last is padding


def test_a_degree_the_checkpoint_cannot_be_split_by_fails_before_any_rank_starts(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, seed=2)  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor-parallel degree 3 must divide the 4"):
        tiny_engine(ckpt, tp=3)


# ---- greedy tokens, TP 1 / TP n / transformers -----------------------------------------
# (checkpoint kwargs, tp): KV heads divide tp; KV heads replicated (kvHeads 2 < tp 4);
# 4 KV heads over 4 ranks with a tied embedding.
CASES = {
    "kv2-tp2": (dict(seed=3), 2),
    "kv2-tp4-replicated": (dict(seed=3), 4),
    "kv4-tp4-tied": (dict(seed=4, hidden=128, heads=8, kv_heads=4, tie_word_embeddings=True), 4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (kw, _) in CASES.items():
        key = json.dumps(kw, sort_keys=True)
        if key not in out:
            out[key] = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), **kw)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_tp1_and_transformers(case, checkpoints):
    transformers = pytest.importorskip("transformers")
    kw, tp = CASES[case]
    ckpt = checkpoints[json.dumps(kw, sort_keys=True)]
    one = tiny_engine(ckpt)
    expected = [s.output for s in one.generate(prompts(), GREEDY)]
    base = prompts((40,))[0]
    expected_hits = [s.output for s in one.generate([base + [5, 6, 7], base[:33]], GREEDY)]

    engine = tiny_engine(ckpt, tp=tp)
    try:
        kv_heads = load_config(ckpt).num_kv_heads
        assert engine.runner.model.part.num_kv_heads == math.ceil(kv_heads / tp)
        seqs = engine.generate(prompts(), GREEDY)
        assert [s.output for s in seqs] == expected
        assert all(s.num_output == GREEDY.max_tokens for s in seqs)
        # A second pass over cached prefixes: prefill reads K/V back from each rank's pages.
        hits = engine.generate([base + [5, 6, 7], base[:33]], GREEDY)
        assert engine.scheduler.bm.hit_tokens >= 32 + 32
        assert [s.output for s in hits] == expected_hits
    finally:
        engine.runner.close()

    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def hf_logits(tokens):
        with torch.inference_mode():
            return hf(torch.tensor([tokens])).logits[0, -1].float()

    for s in seqs:
        assert_greedy_matches(s.output, s.prompt, hf_logits, TOL)


def test_stats_count_kv_bytes_over_all_ranks(checkpoints):
    ckpt = checkpoints[json.dumps(CASES["kv2-tp4-replicated"][0], sort_keys=True)]
    engine = tiny_engine(ckpt, tp=4)
    try:
        # 2 KV heads on 4 ranks: one head each, so the replica holds 4 heads' bytes.
        per_rank = 2 * 2 * 1 * 16 * 4  # K and V, 2 layers, 1 head of 16, fp32
        assert engine.runner.kv_bytes_per_token == per_rank
        assert engine.stats.kv_bytes_per_token == 4 * per_rank
        assert engine.stats.pages_total == engine.scheduler.bm.num_pages == 256 * 4 // 16
        assert engine.stats.capacity_bytes == engine.stats.capacity_tokens * 4 * per_rank
    finally:
        engine.runner.close()


# ---- the worker as the operator starts it ----------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Worker(WorkerProcess):
    """The worker at TP 2 (``WorkerProcess``), and what its tests do to it."""

    def __init__(self, tmp_path: Path, *args: str):
        super().__init__(tmp_path, *args, tp=2)

    def ranks(self) -> list[int]:
        """The pids of ranks 1..tp-1 (children of its engine core, rank 0)."""
        return self.running("kvpilot.worker.parallel")

    def stream_in_background(self, max_tokens=400, wait=True) -> threading.Thread:
        """A long streamed completion, read until the worker goes away; ``wait``: until
        its first event."""
        started = threading.Event()

        def run():
            try:
                with httpx.stream("POST", self.url + "/v1/completions", timeout=60, json={
                        "model": "tiny-llama", "prompt": "a long answer", "stream": True,
                        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}) as r:
                    for _ in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass
            started.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert not wait or started.wait(60)
        return t


def test_the_worker_serves_a_completion_at_tp2_over_http(tmp_path):
    w = Worker(tmp_path)
    try:
        w.wait_ready()
        ranks = w.ranks()
        assert len(ranks) == 1  # rank 1; rank 0 is the worker's engine core
        r = httpx.post(w.url + "/v1/completions", timeout=60, json={
            "model": "tiny-llama", "prompt": "hi", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 8
        # The same text as TP 1 on the same checkpoint.
        one = tiny_engine(w.model_dir)
        prompt = one.tokenizer.encode("hi")
        offline = one.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                        ignore_eos=True))[0]
        assert body["choices"][0]["text"] == one.tokenizer.decode(offline.output)
        values = {s.name: s.value for f in text_string_to_metric_families(
            httpx.get(w.url + contract.PATH_METRICS, timeout=5).text) for s in f.samples}
        # The pool holds the SLA's tokens on each rank; bytes are summed over both ranks
        # (each holds one of the 2 KV heads): the bytes of the whole replica's KV.
        assert values[contract.KV_CAPACITY_TOKENS] == 512 * 2
        whole = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32 on CPU
        assert values[contract.KV_CAPACITY_BYTES] == 512 * 2 * whole
        assert values[contract.KV_BUDGET_BYTES] == w.budget.kv_cache  # per GPU
        w.proc.send_signal(signal.SIGTERM)  # a pod deleted: the ranks stop with it
        # (uvicorn shuts down, then re-raises the signal it caught)
        assert w.proc.wait(timeout=30) in (0, -signal.SIGTERM), w.log.read_text()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in ranks)
    finally:
        w.close()


def test_a_killed_rank_ends_the_worker_with_a_termination_message(tmp_path):
    w = Worker(tmp_path)
    try:
        w.wait_ready()
        (rank1,) = w.ranks()
        w.stream_in_background()  # mid-serve
        killed = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        assert w.proc.wait(timeout=30) == 1, w.log.read_text()
        assert time.monotonic() - killed < 30
        line = w.termination.read_text()
        assert line.startswith(f"{contract.REASON_RANK_FAILED}: rank 1 of 2 (pid {rank1}) "
                               "exited with signal SIGKILL"), line
    finally:
        w.close()


def test_a_hung_rank_ends_the_worker_within_the_timeout(tmp_path):
    w = Worker(tmp_path, "--tp-timeout", "3")
    try:
        w.wait_ready()
        (rank1,) = w.ranks()
        os.kill(rank1, signal.SIGSTOP)  # alive, but never answers a collective again
        stopped = time.monotonic()
        w.stream_in_background(wait=False)
        assert w.proc.wait(timeout=30) == 1, w.log.read_text()
        took = time.monotonic() - stopped
        assert took < 3 + 10, (took, w.log.read_text())
        line = w.termination.read_text()
        assert line.startswith(f"{contract.REASON_RANK_FAILED}: "), (line, w.log.read_text())
        assert not _alive(rank1), w.log.read_text()  # the stopped rank was killed
    finally:
        w.close()
