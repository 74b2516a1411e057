"""Continuous batching with chunked prefill, preemption by recompute and the bounded
waiting queue, in a tiny world of 10 pages of 16 tokens."""

from __future__ import annotations

import pytest

from kvpilot.worker.block_manager import BlockManager
from kvpilot.worker.scheduler import (
    BatchKind,
    FinishReason,
    SamplingParams,
    Scheduler,
    Sequence,
    Status,
    token_finish,
)

PS = 16


def make(num_pages=10, max_num_seqs=8, max_batched_tokens=4096, max_waiting=4):
    bm = BlockManager(num_pages, PS)
    return bm, Scheduler(bm, max_num_seqs=max_num_seqs,
                         max_batched_tokens=max_batched_tokens, max_waiting=max_waiting)


def seq(n: int, start: int = 0, max_tokens: int = 100) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler, token: int = 1):
    """What the engine does around the forward pass: the chunks are computed, and each
    sequence whose chunk reached its end gets one new token."""
    batch = sched.schedule()
    if batch is not None:
        samples = [batch.samples(i) for i in range(len(batch.seqs))]
        sched.computed(batch.seqs, batch.chunks)
        for s, sample in zip(batch.seqs, samples):
            if sample:
                s.tokens.append(token)
    return batch


def test_prefill_then_decode_every_step():
    bm, sched = make()
    a, b = seq(20), seq(5, 100)
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert batch.kind is BatchKind.PREFILL and batch.seqs == [a, b]
    assert bm.table(a.seq_id) == [0, 1] and bm.table(b.seq_id) == [2]
    assert a.num_computed == 20 and len(a) == 21
    batch = run_step(sched)
    assert batch.kind is BatchKind.DECODE and batch.seqs == [a, b] and batch.num_tokens == 2
    assert a.num_computed == 21 and len(a) == 22


def test_new_arrivals_join_the_running_decodes_in_one_step():
    _, sched = make()
    a = seq(20)
    sched.add(a)
    run_step(sched)
    b = seq(3, 100)
    sched.add(b)
    batch = run_step(sched)
    assert batch.kind is BatchKind.MIXED and batch.seqs == [a, b] and batch.chunks == [1, 3]
    assert batch.decodes == 1 and batch.num_tokens == 4
    batch = run_step(sched)
    assert batch.kind is BatchKind.DECODE and batch.seqs == [a, b]


def test_admission_stops_at_max_num_seqs_and_prompts_are_chunked_to_the_budget():
    _, sched = make(max_num_seqs=2)
    s1, s2, s3 = seq(4), seq(4, 10), seq(4, 20)
    for s in (s1, s2, s3):
        sched.add(s)
    assert run_step(sched).seqs == [s1, s2]
    assert list(sched.waiting) == [s3]

    _, sched = make(max_batched_tokens=30)
    s1, s2, s3 = seq(20), seq(20, 100), seq(40, 200)
    for s in (s1, s2, s3):
        sched.add(s)
    batch = run_step(sched)  # s1 whole, the first 10 of s2
    assert (batch.seqs, batch.chunks) == ([s1, s2], [20, 10])
    assert (len(s1), len(s2), s2.num_computed) == (21, 20, 10)  # only s1 sampled
    batch = run_step(sched)  # s1's decode, the rest of s2, s3's first 19
    assert (batch.seqs, batch.chunks) == ([s1, s2, s3], [1, 10, 19])
    assert batch.kind is BatchKind.MIXED and (len(s2), s3.num_computed) == (21, 19)
    batch = run_step(sched)  # the rest of s3 (21) fits beside two decodes
    assert (batch.seqs, batch.chunks) == ([s1, s2, s3], [1, 1, 21]) and len(s3) == 41
    assert run_step(sched).kind is BatchKind.DECODE


def test_a_long_prompt_never_holds_the_decodes_for_more_than_one_step_budget():
    bm, sched = make(max_batched_tokens=32)
    a = seq(8)
    sched.add(a)
    run_step(sched)
    long = seq(100, 1000)
    sched.add(long)
    chunks = []
    while len(long) == 100:
        batch = run_step(sched)
        assert batch.seqs[0] is a and batch.chunks[0] == 1  # a decodes every step
        assert batch.num_tokens <= 32
        chunks.append(batch.chunks[1])
    assert chunks == [31, 31, 31, 7]
    assert long.num_computed == 100 and len(long) == 101 and len(a) == 13
    # Its pages were allocated whole at admission: a chunk never waits for pages.
    assert len(bm.table(long.seq_id)) == 7


def test_waiting_queue_is_bounded():
    _, sched = make(max_waiting=2)
    assert sched.add(seq(4)) and sched.add(seq(4, 10))
    assert not sched.can_add()
    assert not sched.add(seq(4, 20))
    assert len(sched.waiting) == 2


def test_fifo_admission_does_not_skip_a_big_head():
    bm, sched = make()
    a = seq(100)  # 7 pages
    sched.add(a)
    run_step(sched)
    big, small = seq(60, 1000), seq(4, 2000)  # big needs 4 pages, 3 are free
    sched.add(big)
    sched.add(small)
    batch = run_step(sched)
    assert batch.kind is BatchKind.DECODE and batch.seqs == [a]
    assert list(sched.waiting) == [big, small]


def test_newest_is_preempted_when_pages_run_out_and_recomputed_later():
    bm, sched = make()
    a, b = seq(64), seq(79, 1000)  # 4 pages and 5 pages (b's last page holds 15 tokens)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # prefill: a -> pages 0-3, b -> 4-8; page 9 free
    assert (len(a), len(b)) == (65, 80)
    # a's next token (position 64) needs a 5th page: page 9. b still fits in its 5.
    batch = run_step(sched)
    assert batch.seqs == [a, b] and bm.table(a.seq_id)[-1] == 9 and bm.num_free == 0
    # b's next token (position 80) needs a 6th page: none left, b (newest) is preempted.
    batch = run_step(sched)
    assert batch.kind is BatchKind.DECODE and batch.seqs == [a] and batch.preempted == [b]
    assert b.status is Status.WAITING and list(sched.waiting) == [b]
    assert b.num_computed == 0 and b.preemptions == 1 and sched.num_preemptions == 1
    assert not bm.has(b.seq_id)
    # b's full pages stayed in the prefix cache.
    assert bm.num_cached_free == 5
    # a finishes: b is recomputed (prompt + its 2 generated tokens), mostly from the cache.
    sched.finish(a, FinishReason.LENGTH)
    batch = run_step(sched)
    # 80 of its 81 tokens were found: only the last is computed, as a decode would.
    assert batch.seqs == [b] and batch.chunks == [1] and batch.kind is BatchKind.DECODE
    assert len(b) == 82 and b.output == [1, 1, 1]
    assert bm.hit_tokens == 80  # 5 whole pages of b found again


def test_a_lone_sequence_that_outgrows_the_pool_preempts_itself():
    bm, sched = make(num_pages=2)
    a = seq(32)
    sched.add(a)
    run_step(sched)  # 2 pages, len 33: the next token needs a 3rd
    batch = run_step(sched)
    assert batch.seqs == [] and batch.preempted == [a]
    assert a.status is Status.WAITING and bm.num_used == 0


def test_oldest_keeps_running_under_pressure():
    bm, sched = make()
    seqs = [seq(48, i * 1000) for i in range(3)]  # 3 pages each: 9 of 10
    for s in seqs:
        sched.add(s)
    run_step(sched)
    # Position 48 needs a 4th page each, one is free: the first takes it, the newest is
    # preempted and its 3 pages let the second go on.
    batch = run_step(sched)
    assert batch.seqs == seqs[:2] and batch.preempted == [seqs[2]]
    assert bm.table(seqs[0].seq_id)[-1] == 9
    assert bm.table(seqs[1].seq_id)[-1] == 8  # the last of seqs[2]'s, freed first
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    # 2 pages free, seqs[2] needs 4: it waits until the others give pages back.
    for _ in range(15):
        assert run_step(sched).seqs == seqs[:2]
    sched.finish(seqs[0], FinishReason.LENGTH)
    batch = run_step(sched)
    assert batch.kind is BatchKind.MIXED and batch.seqs == seqs[1:]
    # Of its 2 full pages still cached, seqs[1]'s next page (scheduled first: running
    # sequences go before admissions) evicted one.
    assert bm.hit_tokens == 16


def test_finish_and_abort_free_pages_wherever_the_sequence_is():
    bm, sched = make()
    a, b = seq(20), seq(20, 100)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(b, FinishReason.ABORT)  # still waiting
    assert not sched.waiting and b.status is Status.FINISHED
    sched.finish(a, FinishReason.ABORT)
    assert not sched.running and bm.num_used == 0
    assert sched.schedule() is None


@pytest.mark.parametrize("tokens, params, expected", [
    ([1, 2, 9], SamplingParams(max_tokens=5), FinishReason.STOP),
    ([1, 2, 9], SamplingParams(max_tokens=5, ignore_eos=True), None),
    ([1, 2, 7], SamplingParams(max_tokens=5, stop_token_ids=frozenset({7})), FinishReason.STOP),
    ([1, 2, 3, 4], SamplingParams(max_tokens=2), FinishReason.LENGTH),
    ([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=50), FinishReason.LENGTH),  # context
    ([1, 2, 3], SamplingParams(max_tokens=2), None),
])
def test_token_finish(tokens, params, expected):
    s = Sequence([1, 2], params)
    s.tokens = list(tokens)
    assert token_finish(s, {9}, max_model_len=6) is expected


def test_finishing_during_postprocess_leaves_the_batch_whole():
    _, sched = make()
    a, b = seq(4), seq(4, 10)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    batch = sched.schedule()
    sched.finish(a, FinishReason.LENGTH)  # what the engine does while walking the batch
    assert batch.seqs == [a, b] and sched.running == [b]


def test_a_partly_prefilled_sequence_can_be_preempted_and_starts_over():
    bm, sched = make(num_pages=6, max_batched_tokens=10)
    a, b = seq(47), seq(40, 1000)  # 3 pages each: the whole pool
    sched.add(a)
    sched.add(b)
    for _ in range(4):
        assert run_step(sched).seqs == [a]  # 40 of a's 47; b waits for budget
    batch = run_step(sched)
    assert (batch.seqs, batch.chunks) == ([a, b], [7, 3]) and bm.num_free == 0
    batch = run_step(sched)
    assert batch.chunks == [1, 9] and b.num_computed == 12
    # a's position 48 needs a 4th page: b, the newest, half prefilled, is preempted.
    batch = run_step(sched)
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.num_computed == 0 and b.status is Status.WAITING and b.output == []
