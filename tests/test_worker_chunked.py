"""Chunked prefill on CPU: an engine whose step budget cuts prompts into chunks and mixes
them with running decodes gives, greedy, the tokens of an engine that prefills whole
prompts and of transformers (float32): a plain Llama, a Gemma 3 (rings of pages, read
back a window at a time), a windowed Mistral, with prefix hits, and at TP 2 (the mixed
step goes to every rank)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvpilot.worker.scheduler import BatchKind, SamplingParams, Sequence  # noqa: E402
from tests.family_helpers import (  # noqa: E402
    BF16_TOL,
    GREEDY,
    assert_transformers_agrees,
    write_family_checkpoint,
)
from tests.worker_helpers import tiny_engine  # noqa: E402

# Prompts of 1 to 70 tokens: the longer ones take several chunks of a 24-token budget.
PROMPTS = [[(5 * i + 3 * n) % 250 + 1 for i in range(n)] for n in (1, 9, 33, 70, 17)]


def staggered(engine, prompts, params=GREEDY, *, every: int = 3):
    """Add a prompt every ``every`` steps, so new prompts arrive while others decode;
    run to the end. The sequences, and the kinds of step the engine took."""
    seqs = [Sequence(list(p), params) for p in prompts]
    kinds = []
    pending = list(seqs)
    step = 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            engine.add(pending.pop(0), detokenize=False)
        batch_kinds = engine.scheduler.schedule  # observe the kind of each scheduled batch
        real = engine.scheduler.schedule

        def spy():
            batch = real()
            if batch is not None and batch.seqs:
                kinds.append(batch.kind)
            return batch

        engine.scheduler.schedule = spy
        engine.step()
        engine.scheduler.schedule = batch_kinds
        step += 1
    return seqs, kinds


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        "llama": write_family_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=1),
        "gemma3_text": write_family_checkpoint(tmp_path_factory.mktemp("gemma3"),
                                               "gemma3_text", seed=2),
        "mistral": write_family_checkpoint(tmp_path_factory.mktemp("mistral"), "mistral",
                                           seed=3, sliding_window=16),
    }


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "mistral"])
def test_chunked_and_mixed_steps_give_the_whole_prompt_tokens(model_type, checkpoints):
    ckpt = checkpoints[model_type]
    whole = tiny_engine(ckpt, max_batched_tokens=4096)
    expected, kinds = staggered(whole, PROMPTS)
    assert BatchKind.MIXED in kinds  # arrivals join the running decodes
    chunked = tiny_engine(ckpt, max_batched_tokens=24, max_num_seqs=4)
    got, kinds = staggered(chunked, PROMPTS)
    assert [s.output for s in got] == [s.output for s in expected]
    assert kinds.count(BatchKind.MIXED) >= 3
    assert_transformers_agrees(ckpt, got)
    assert chunked.scheduler.bm.num_used == 0


def test_a_chunked_prompt_after_a_prefix_hit(checkpoints):
    ckpt = checkpoints["llama"]
    engine = tiny_engine(ckpt, max_batched_tokens=20, max_num_seqs=4)
    base = PROMPTS[3]
    first, _ = staggered(engine, [base])
    hit, _ = staggered(engine, [base[:64] + [7, 8, 9, 10, 11, 12]])
    assert engine.scheduler.bm.hit_tokens >= 64
    assert_transformers_agrees(ckpt, first + hit)


def test_only_a_chunk_that_ends_its_prompt_samples(checkpoints):
    engine = tiny_engine(checkpoints["llama"], max_batched_tokens=16, max_num_seqs=4)
    seq = Sequence(list(PROMPTS[3]), SamplingParams(max_tokens=3, temperature=0.0))
    engine.add(seq, detokenize=False)
    outputs = [engine.step() for _ in range(4)]  # 70 tokens: chunks of 16, 16, 16, 16
    assert [len(o) for o in outputs] == [0, 0, 0, 0] and seq.num_computed == 64
    assert seq.first_token_time is None
    (out,) = engine.step()  # the last 6 tokens: the first output token
    assert out.token_ids == seq.output and seq.num_output == 1


def test_tp2_mixed_steps_equal_tp1(checkpoints):
    ckpt = checkpoints["gemma3_text"]
    expected, _ = staggered(tiny_engine(ckpt, max_batched_tokens=24, max_num_seqs=4), PROMPTS)
    engine = tiny_engine(ckpt, tp=2, max_batched_tokens=24, max_num_seqs=4)
    try:
        got, kinds = staggered(engine, PROMPTS)
        assert BatchKind.MIXED in kinds
        assert [s.output for s in got] == [s.output for s in expected]
    finally:
        engine.runner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_gpu_mixed_steps_agree_with_transformers(model_type, checkpoints):
    """Mixed steps (eager, the paged kernel for their decode rows) between decode steps
    replayed from CUDA graphs, bf16."""
    ckpt = checkpoints[model_type]
    engine = tiny_engine(ckpt, device="cuda", dtype="bf16", kv_dtype="bf16",
                         max_batched_tokens=24, max_num_seqs=4)
    assert engine.runner.cuda_graphs
    got, kinds = staggered(engine, PROMPTS)
    assert BatchKind.MIXED in kinds and BatchKind.DECODE in kinds
    assert_transformers_agrees(ckpt, got, tol=BF16_TOL)
