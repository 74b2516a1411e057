"""Sequences and the continuous-batching scheduler. Plain Python.

Each engine step is one forward pass over one batch (``schedule -> run -> postprocess``),
built within a budget of ``max_batched_tokens`` new tokens (chunked prefill, as vLLM's
V1 scheduler does):

* **Running sequences first**, oldest first: a decoding one computes its last token (one
  token of the budget); one whose prompt is still being prefilled computes its next chunk,
  as much of the rest as the budget left allows. A sequence whose next token needs a page
  that is not there takes it from the newest running sequence, which is preempted: its
  pages are freed and it goes back to the front of the waiting queue, to be recomputed
  (prompt + what it had generated) when pages allow. Its full pages usually survive in
  the prefix cache, so the recompute is mostly cache hits. Nothing fails for lack of
  pages; the oldest sequences keep running.
* **Then waiting sequences**, first in, first out, while the block manager has pages for
  all their tokens (allocated at admission, so a prompt never stalls half-way for
  pages), the running count stays under ``max_num_seqs`` and budget is left: each gets a
  first chunk. A prompt's prefix found in the prefix cache is not computed again.

So a step mixes every running decode with prefill chunks, and a long prompt never holds
the decodes for more than one step's budget. A sequence samples its next token in the
step whose chunk reaches its last token; a chunk short of that only fills its KV.

The waiting queue is bounded (``max_waiting``): ``can_add`` says no beyond it, which the
server answers with 429 and Retry-After. Preempted sequences re-enter it regardless:
they were accepted already.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvpilot.worker.block_manager import BlockManager, KVGroups


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens, or the context limit
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # the engine failed on this sequence (its forward pass or sampling)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 is greedy; a positive one below the sampler's
    ``MIN_TEMPERATURE`` (0.01) samples at that floor. ``top_k`` 0 means all tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. ``num_computed``: leading tokens whose K/V is in
    the cache (all but the last, between steps)."""

    prompt: list[int]
    params: SamplingParams
    arrival: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    finish_reason: FinishReason | None = None
    preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt)


def token_finish(seq: Sequence, eos_ids: Iterable[int], max_model_len: int) -> FinishReason | None:
    """Why the sequence is done after its last token, by tokens alone (stop strings are
    the detokenizer's): an end token, max_tokens, or the context limit."""
    last = seq.tokens[-1]
    if last in seq.params.stop_token_ids or (not seq.params.ignore_eos and last in eos_ids):
        return FinishReason.STOP
    if seq.num_output >= seq.params.max_tokens or len(seq) >= max_model_len:
        return FinishReason.LENGTH
    return None


class BatchKind(enum.Enum):
    PREFILL = "prefill"  # prefill chunks only
    DECODE = "decode"  # one token of each sequence, its last
    MIXED = "mixed"  # decodes and prefill chunks in one pass


@dataclass
class Batch:
    """One step's work: sequence ``seqs[i]`` computes its tokens ``num_computed ..
    num_computed + chunks[i] - 1``. A decode is a chunk of one that ends the sequence."""

    seqs: list[Sequence]
    chunks: list[int]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunks)

    @property
    def decodes(self) -> int:
        """How many of the sequences are decodes."""
        return sum(1 for s, c in zip(self.seqs, self.chunks) if is_decode(s, c))

    @property
    def kind(self) -> BatchKind:
        decodes = self.decodes
        if decodes == len(self.seqs):
            return BatchKind.DECODE
        return BatchKind.PREFILL if decodes == 0 else BatchKind.MIXED

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]``'s chunk reaches its last token (it samples a new one)."""
        return self.seqs[i].num_computed + self.chunks[i] == len(self.seqs[i])


def is_decode(seq: Sequence, chunk: int) -> bool:
    """A chunk of one token that ends the sequence: what a decode step computes."""
    return chunk == 1 and seq.num_computed + 1 == len(seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager | KVGroups, *, max_num_seqs: int,
                 max_batched_tokens: int, max_waiting: int):
        if max_num_seqs < 1 or max_batched_tokens < 1 or max_waiting < 0:
            raise ValueError("max_num_seqs and max_batched_tokens must be >= 1, "
                             "max_waiting >= 0")
        # A bare pool is a model's one KV group.
        self.bm = (block_manager if isinstance(block_manager, KVGroups)
                   else KVGroups([block_manager]))
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    # ---- admission --------------------------------------------------------------------
    def can_add(self) -> bool:
        return len(self.waiting) < self.max_waiting

    def add(self, seq: Sequence) -> bool:
        """Queue a new sequence; False (nothing queued) when the waiting queue is full."""
        if not self.can_add():
            return False
        seq.status = Status.WAITING
        self.waiting.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        budget = self.max_batched_tokens
        preempted: list[Sequence] = []
        seqs: list[Sequence] = []
        chunks: list[int] = []
        kept: list[Sequence] = []
        queue = deque(self.running)  # oldest first; the newest is preempted first
        while queue:
            seq = queue.popleft()
            while not self.bm.append(seq.seq_id, len(seq)):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                kept.append(seq)
                chunk = min(len(seq) - seq.num_computed, budget)
                if chunk > 0:
                    seqs.append(seq)
                    chunks.append(chunk)
                    budget -= chunk
        self.running = kept
        for seq, chunk in self._admit(budget):
            seqs.append(seq)
            chunks.append(chunk)
        if not seqs and not preempted:
            return None
        return Batch(seqs, chunks, preempted)

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        admitted: list[tuple[Sequence, int]] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            allocation = self.bm.allocate(seq.seq_id, seq.tokens)
            if allocation is None:
                break  # first in, first out: later ones wait behind it
            self.waiting.popleft()
            seq.num_computed = allocation.cached_tokens
            seq.status = Status.RUNNING
            chunk = min(len(seq) - seq.num_computed, budget)
            budget -= chunk
            self.running.append(seq)
            admitted.append((seq, chunk))
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after a step -----------------------------------------------------------------
    def computed(self, seqs: Iterable[Sequence], chunks: Iterable[int]) -> None:
        """These chunks ran: their tokens' K/V is in the cache, and the sequences' full
        pages join the prefix cache."""
        for seq, chunk in zip(seqs, chunks):
            seq.num_computed += chunk
            self.bm.commit(seq.seq_id, seq.tokens, seq.num_computed)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence wherever it is (running or waiting) and free its pages."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
