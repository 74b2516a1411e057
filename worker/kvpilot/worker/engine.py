"""The engine: ``schedule -> run -> postprocess``, one step at a time.

``Engine.step`` asks the scheduler for a batch, runs it through the model runner,
samples one token per sequence, and turns tokens into text (stop strings are matched on
the text; what could still become a stop string is held back while streaming). It
returns one ``Output`` per sequence that got a token or finished. A sequence's trouble
stays with it: a row that cannot be sampled (non-finite logits) fails alone, and a batch
whose forward pass raises is run again in halves until the sequences that break it are
alone, so only they finish with an error (their pages freed, none of their pages put in
the prefix cache) and the others go on. The worker never goes down for a bad batch.

A worker runs it in its engine core process (``kvpilot.worker.core``), which adds
requests without detokenizing: text and stop strings are the HTTP server's process's.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass

from kvpilot.worker.runner import ModelRunner
from kvpilot.worker.sampler import Sampler
from kvpilot.worker.scheduler import (
    FinishReason,
    SamplingParams,
    Scheduler,
    Sequence,
    Status,
    token_finish,
)
from kvpilot.worker.stats import EngineStats
from kvpilot.worker.tokenizer import Detokenizer, Tokenizer

log = logging.getLogger("kvpilot.worker")


class QueueFull(Exception):
    """The waiting queue is at its bound."""


@dataclass
class Output:
    seq_id: int
    text: str  # new text since the last output
    token_ids: list[int]  # new tokens since the last output
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    seq: Sequence
    detokenizer: Detokenizer | None
    text: str = ""
    emitted: int = 0  # characters of text already sent
    sent_tokens: int = 0


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer | None,
                 stats: EngineStats, *, max_model_len: int, eos_token_ids: set[int],
                 seed: int = 0):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.stats = stats
        self.stats_lock = threading.Lock()
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.sampler = Sampler(runner.device, seed)
        self.weight_read_bytes = runner.model.w.read_per_step_bytes()
        self._requests: dict[int, _Request] = {}

    # ---- requests ---------------------------------------------------------------------
    def add(self, seq: Sequence, *, detokenize: bool = True) -> None:
        """Queue a sequence (its length limits are the server's to check); raises
        QueueFull when the waiting queue is at its bound."""
        if not self.scheduler.add(seq):
            raise QueueFull
        detok = None
        if detokenize and self.tokenizer is not None:
            detok = Detokenizer(self.tokenizer, seq.prompt[-4:])
        self._requests[seq.seq_id] = _Request(seq, detok)
        with self.stats_lock:
            self.stats.prompt_tokens += seq.num_prompt

    def abort(self, seq_id: int) -> bool:
        req = self._requests.pop(seq_id, None)
        if req is None:
            return False
        self.scheduler.finish(req.seq, FinishReason.ABORT)
        self.sampler.forget(seq_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[Output]:
        batch = self.scheduler.schedule()
        outputs: list[Output] = []
        if batch is not None and batch.seqs:
            start = time.monotonic()
            samples = [batch.samples(i) for i in range(len(batch.seqs))]
            decodes = batch.decodes  # before the chunks are counted as computed
            tokens, errors = self._run(batch.seqs, batch.chunks, samples)
            now = time.monotonic()
            failed = {seq.seq_id for seq, _ in errors}
            ran = [(s, c) for s, c in zip(batch.seqs, batch.chunks) if s.seq_id not in failed]
            # Only chunks computed cleanly commit their pages to the prefix cache.
            self.scheduler.computed([s for s, _ in ran], [c for _, c in ran])
            with self.stats_lock:
                if decodes:  # what a running stream waited for this step
                    self.stats.decode_step.observe(now - start)
                if decodes == len(batch.seqs):
                    kv = sum(len(s) for s in batch.seqs) * self.runner.kv_bytes_per_token
                    self.stats.step_read_bytes = self.weight_read_bytes + kv
                done = [s for s in batch.seqs if s.seq_id in tokens]
                self.stats.generation_tokens += len(done)
                outputs = [self._postprocess(s, tokens[s.seq_id], now) for s in done]
            outputs += [self._fail(seq, message) for seq, message in errors]
        self._refresh_stats()
        return outputs

    def _run(self, seqs: list[Sequence], chunks: list[int], samples: list[bool], *,
             retry: bool = False) -> tuple[dict[int, int], list[tuple[Sequence, str]]]:
        """Forward ``seqs`` by their ``chunks`` and sample those whose chunk ends them
        (``samples``): the new token of each sequence that got one (by seq_id) and why
        each failed sequence failed.

        A forward pass that raises is retried in halves, down to single sequences, so one
        sequence that breaks its batch costs about 2*log2(n) extra passes and fails alone;
        rerunning a pass rewrites the same KV slots with the same values. When every
        sequence fails alone (a dead device), all of them fail, as before."""
        try:
            logits = self.runner.run(seqs, chunks)
            rows = [r for r, sample in enumerate(samples) if sample]
            sampled = None
            if rows:
                sampled = self.sampler.sample(logits[rows] if len(rows) < len(seqs) else logits,
                                              [seqs[r].seq_id for r in rows],
                                              [seqs[r].params for r in rows])
        except Exception as err:  # noqa: BLE001 - the worker must outlive a bad batch
            if not retry:  # one traceback per failed batch, not one per half
                log.exception("a batch of %d sequences failed", len(seqs))
            if len(seqs) == 1:
                if retry:
                    log.error("sequence %d fails alone: %s: %s", seqs[0].seq_id,
                              type(err).__name__, err)
                return {}, [(seqs[0], f"{type(err).__name__}: {err}")]
            half = len(seqs) // 2
            tokens, errors = self._run(seqs[:half], chunks[:half], samples[:half], retry=True)
            more_tokens, more_errors = self._run(seqs[half:], chunks[half:], samples[half:],
                                                 retry=True)
            return tokens | more_tokens, errors + more_errors
        tokens: dict[int, int] = {}
        errors: list[tuple[Sequence, str]] = []
        for i, r in enumerate(rows):
            seq = seqs[r]
            if i in sampled.failed:
                log.error("sequence %d could not be sampled: %s", seq.seq_id, sampled.failed[i])
                errors.append((seq, sampled.failed[i]))
            else:
                tokens[seq.seq_id] = sampled.tokens[i]
        return tokens, errors

    def _postprocess(self, seq: Sequence, token: int, now: float) -> Output:
        """One sequence's new token: timing, finish, text. Called under ``stats_lock``."""
        seq.tokens.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.ttft.observe(now - seq.arrival)
        else:
            self.stats.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        reason = token_finish(seq, self.eos_token_ids, self.max_model_len)
        req = self._requests[seq.seq_id]
        hold = 0
        if req.detokenizer is not None:
            req.text += req.detokenizer.add(token)
            stops = seq.params.stop
            found = [i for i in (req.text.find(s, max(0, req.emitted - len(s))) for s in stops)
                     if i >= 0]
            if found:  # the text ends before the stop string, which is not sent
                req.text = req.text[:min(found)]
                reason = FinishReason.STOP
            else:
                hold = max((len(s) for s in stops), default=1) - 1
                if reason is not None:
                    req.text += req.detokenizer.flush()
        if reason is not None:
            self._retire(seq, reason)
        upto = len(req.text) if reason is not None else max(req.emitted, len(req.text) - hold)
        text, req.emitted = req.text[req.emitted:upto], upto
        new_tokens = seq.tokens[seq.num_prompt + req.sent_tokens:]
        req.sent_tokens = seq.num_output
        return Output(seq.seq_id, text, new_tokens, reason, seq.num_prompt, seq.num_output)

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq.seq_id, None)
        self.sampler.forget(seq.seq_id)

    def _fail(self, seq: Sequence, message: str) -> Output:
        req = self._requests.get(seq.seq_id)
        self._retire(seq, FinishReason.ERROR)
        text = req.text[req.emitted:] if req else ""
        return Output(seq.seq_id, text, [], FinishReason.ERROR, seq.num_prompt,
                      seq.num_output, error=message)

    def _refresh_stats(self) -> None:
        bm, sched = self.scheduler.bm, self.scheduler
        with self.stats_lock:
            s = self.stats
            s.pages_used = bm.num_used
            if len(bm.pools) > 1:
                s.window_pages_used = bm.pools[1].num_used
            s.pages_cached = bm.num_cached_free
            s.running = len(sched.running)
            s.waiting = len(sched.waiting)
            s.preemptions = sched.num_preemptions
            s.prefix_queried_tokens = bm.queried_tokens
            s.prefix_hit_tokens = bm.hit_tokens

    def snapshot(self) -> EngineStats:
        with self.stats_lock:
            return copy.deepcopy(self.stats)

    # ---- offline use (tests, benchmarks) ----------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 detokenize: bool = False) -> list[Sequence]:
        """Run prompts to completion on the calling thread; the finished sequences."""
        seqs = [Sequence(list(p), params, arrival=time.monotonic()) for p in prompts]
        for s in seqs:
            self.add(s, detokenize=detokenize)
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
        return seqs

