"""The block manager: which KV page holds which tokens of which sequence. Plain Python.

Pages
    The KV cache is ``num_pages`` pages of ``page_size`` tokens
    (``kvpilot.worker.kernels.cache``). A sequence's page table lists, in token order, the
    pages that hold its tokens: entry ``i`` holds tokens ``i * page_size ..``. Every table
    handed to a kernel comes from here, so no kernel ever sees a page id this manager did
    not give out (``check_batch`` verifies that on the host behind a debug setting).

Every page is in exactly one of three states:

    used         ref_count > 0: held by one or more sequences (shared prefix pages
                 have one reference per sequence).
    cached free  ref_count == 0 but still holding a full page of known tokens that a
                 later prompt may reuse; on ``_cached_free``, least recently freed first.
    empty free   ref_count == 0 and holding nothing reusable; on ``_empty``.

A fresh page is taken from the empty pages first and only then by evicting the least
recently freed cached page, so reusable prefixes live as long as there is room.

Prefix caching
    A full page is identified by a chained hash: ``blake2b(parent hash || its tokens)``,
    so equal hashes mean equal whole prefixes, not just equal pages. A page is
    registered once its tokens are computed (``commit``), never at allocation, so a hit
    always finds K/V that is actually there. A lookup compares the stored tokens and
    parent hash as well (a hit is verified, not trusted to the hash). Only pages wholly
    inside ``tokens[:-1]`` can hit: the last prompt token is always computed, because its
    logits give the first output token.

Check-then-mutate
    ``can_allocate``/``allocate`` and ``can_append``/``append`` come in pairs; the
    mutators return None or False instead of raising when pages run out, and change
    nothing then.

Sliding windows (``ring_pages``)
    A pool for sliding-window layers gives each sequence at most ``ring_pages`` pages
    (the window rounded up to pages) and uses them as a ring: position ``p`` lives in
    page ``table[(p // page_size) % ring_pages]``. Writing a token overwrites the one
    ``ring_pages x page_size`` positions earlier, which the window no longer reads, so
    a sequence of any length holds its window and nothing more: what
    ``kvpilot.api.memory`` counts for a local layer, to the page. ``row`` gives the
    block-table row a kernel reads (the ring repeated); the decode kernel reads only
    the window's slots. Such a pool has no prefix cache.

KV groups (``KVGroups``)
    A model whose layers keep different tokens (Gemma: global layers keep all, local
    ones their window) has one pool per group of layers, each its own page ids; a
    sequence holds pages in every pool at once. ``KVGroups`` allocates, grows and frees
    in all of them together, all or nothing, and answers the scheduler as one manager.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT_HASH = b""


def page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full page: its parent's hash and its tokens."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class _Page:
    page_id: int
    ref_count: int = 0
    hash: bytes | None = None
    parent: bytes = ROOT_HASH
    tokens: tuple[int, ...] = ()


@dataclass
class _Table:
    pages: list[int] = field(default_factory=list)
    # Hashes of the leading pages already registered in the prefix cache (full, computed).
    hashes: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Allocation:
    """What ``allocate`` did: the pages now backing the prompt and how many of its tokens
    were found in the prefix cache (their K/V need not be computed)."""

    pages: tuple[int, ...]
    cached_tokens: int


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True,
                 ring_pages: int | None = None):
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be >= 1")
        if ring_pages is not None and not 1 <= ring_pages <= num_pages:
            raise ValueError(f"ring_pages must be 1..num_pages ({num_pages}), got {ring_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.ring_pages = ring_pages
        self.prefix_caching = prefix_caching and ring_pages is None
        self._pages = [_Page(i) for i in range(num_pages)]
        self._empty: deque[int] = deque(range(num_pages))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}
        self._tables: dict[int, _Table] = {}
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, found

    # ---- counts -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages a new sequence can take (empty plus cached free)."""
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens holds (a ring's at most)."""
        pages = -(-num_tokens // self.page_size)
        return pages if self.ring_pages is None else min(pages, self.ring_pages)

    def table(self, seq_id: int) -> list[int]:
        """The page table of a sequence (read it, never change it)."""
        return self._tables[seq_id].pages

    def row(self, seq_id: int, entries: int) -> list[int]:
        """The first ``entries`` entries of the block-table row a kernel reads: the page
        table, or a ring's pages repeated."""
        pages = self._tables[seq_id].pages
        if self.ring_pages is None:
            return pages[:entries]
        return [pages[i % self.ring_pages] for i in range(entries)]

    def slot(self, seq_id: int, position: int) -> int:
        """Where the K/V of ``position`` goes (IndexError beyond the sequence's pages)."""
        index = position // self.page_size
        if self.ring_pages is not None:
            index %= self.ring_pages
        pages = self._tables[seq_id].pages
        if not 0 <= index < len(pages):
            raise IndexError(f"position {position} is beyond the sequence's pages")
        return pages[index] * self.page_size + position % self.page_size

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def ref_count(self, page_id: int) -> int:
        return self._pages[page_id].ref_count

    # ---- prefix lookup ----------------------------------------------------------------
    def _lookup(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Pages (and their hashes) holding the longest cached, verified prefix of
        ``tokens[:-1]`` in whole pages."""
        hits: list[int] = []
        hashes: list[bytes] = []
        if not self.prefix_caching:
            return hits, hashes
        parent = ROOT_HASH
        ps = self.page_size
        for i in range((len(tokens) - 1) // ps):
            chunk = tuple(tokens[i * ps:(i + 1) * ps])
            h = page_hash(parent, chunk)
            page_id = self._by_hash.get(h)
            if page_id is None:
                break
            page = self._pages[page_id]
            if page.tokens != chunk or page.parent != parent:
                break  # a hash collision: never reuse what does not match
            hits.append(page_id)
            hashes.append(h)
            parent = h
        return hits, hashes

    # ---- allocate ---------------------------------------------------------------------
    def can_allocate(self, tokens: Sequence[int]) -> bool:
        return self._fits(tokens, self._lookup(tokens)[0])

    def _fits(self, tokens: Sequence[int], hits: list[int]) -> bool:
        """Whether ``tokens`` fit, reusing the cached pages ``hits``."""
        revived = sum(1 for p in hits if self._pages[p].ref_count == 0)
        fresh = self.pages_for(len(tokens)) - len(hits)
        return fresh + revived <= self.num_free

    def allocate(self, seq_id: int, tokens: Sequence[int]) -> Allocation | None:
        """Pages for all of ``tokens`` (a prompt, or prompt + output when recomputing a
        preempted sequence); None, changing nothing, when there are too few."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has pages")
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        hits, hashes = self._lookup(tokens)
        if not self._fits(tokens, hits):
            return None
        for page_id in hits:
            page = self._pages[page_id]
            if page.ref_count == 0:
                del self._cached_free[page_id]
            page.ref_count += 1
        fresh = [self._take() for _ in range(self.pages_for(len(tokens)) - len(hits))]
        table = _Table(pages=hits + fresh, hashes=hashes)
        self._tables[seq_id] = table
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.page_size
        return Allocation(tuple(table.pages), len(hits) * self.page_size)

    def _take(self) -> int:
        """A page for new tokens: an empty one, else the least recently freed cached one."""
        if self._empty:
            page_id = self._empty.popleft()
        else:
            page_id, _ = self._cached_free.popitem(last=False)
        page = self._pages[page_id]
        if page.hash is not None:
            del self._by_hash[page.hash]
            page.hash, page.parent, page.tokens = None, ROOT_HASH, ()
        page.ref_count = 1
        return page_id

    # ---- append -----------------------------------------------------------------------
    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens."""
        need = self.pages_for(num_tokens) - len(self._tables[seq_id].pages)
        return need <= self.num_free

    def append(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the sequence's pages to hold ``num_tokens`` tokens; False, changing
        nothing, when there are too few free pages."""
        if not self.can_append(seq_id, num_tokens):
            return False
        table = self._tables[seq_id]
        while len(table.pages) < self.pages_for(num_tokens):
            table.pages.append(self._take())
        return True

    # ---- prefix registration ----------------------------------------------------------
    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        """Register the sequence's full pages whose K/V is computed (the first
        ``num_computed`` of ``tokens``) in the prefix cache."""
        if not self.prefix_caching:
            return
        table = self._tables[seq_id]
        ps = self.page_size
        full = min(num_computed // ps, len(table.pages))
        for i in range(len(table.hashes), full):
            parent = table.hashes[-1] if table.hashes else ROOT_HASH
            chunk = tuple(tokens[i * ps:(i + 1) * ps])
            h = page_hash(parent, chunk)
            page = self._pages[table.pages[i]]
            table.hashes.append(h)
            if page.hash is not None or h in self._by_hash:
                continue  # already registered, or an equal page is: keep the first
            page.hash, page.parent, page.tokens = h, parent, chunk
            self._by_hash[h] = page.page_id

    # ---- free -------------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        """Drop the sequence's references. Its pages are released last page first, so
        the least recently freed (evicted first) are the ends of sequences and the
        shared prefixes stay longest."""
        table = self._tables.pop(seq_id)
        for page_id in reversed(table.pages):
            page = self._pages[page_id]
            page.ref_count -= 1
            if page.ref_count > 0:
                continue
            if page.hash is not None:
                self._cached_free[page_id] = None
            else:
                self._empty.append(page_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached free page (used pages keep their registration)."""
        while self._cached_free:
            page_id, _ = self._cached_free.popitem(last=False)
            page = self._pages[page_id]
            if page.hash is not None:  # a cached free page is registered
                del self._by_hash[page.hash]
            page.hash, page.parent, page.tokens = None, ROOT_HASH, ()
            self._empty.append(page_id)


class KVGroups:
    """The pools of a model's KV groups, each its own ``BlockManager``, as one: a sequence
    holds pages in every pool, and is admitted, grown and freed in all at once (all or
    nothing). The first pool is the one that bounds a sequence's length (a global
    layers' pool; a model of only sliding-window layers has only a ring); lengths, page
    counts and the prefix cache are its. A model with a ring has no prefix cache at all:
    a hit is of no use to its local layers, whose window would be missing."""

    def __init__(self, pools: Sequence[BlockManager]):
        if not pools or len({p.page_size for p in pools}) != 1:
            raise ValueError("KV groups need at least one pool, all of one page size")
        self.pools = list(pools)
        if any(p.ring_pages is not None for p in self.pools):
            for p in self.pools:
                p.prefix_caching = False
        self.primary = self.pools[0]
        self.page_size = self.primary.page_size

    # ---- the primary pool's counts ------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.primary.num_pages

    @property
    def num_free(self) -> int:
        return self.primary.num_free

    @property
    def num_used(self) -> int:
        return self.primary.num_used

    @property
    def num_cached_free(self) -> int:
        return self.primary.num_cached_free

    @property
    def queried_tokens(self) -> int:
        return self.primary.queried_tokens

    @property
    def hit_tokens(self) -> int:
        return self.primary.hit_tokens

    @property
    def prefix_caching(self) -> bool:
        return self.primary.prefix_caching

    def pages_for(self, num_tokens: int) -> int:
        return self.primary.pages_for(num_tokens)

    def table(self, seq_id: int) -> list[int]:
        return self.primary.table(seq_id)

    def has(self, seq_id: int) -> bool:
        return self.primary.has(seq_id)

    def usage(self) -> float:
        """The fullest pool's share of used pages: the one that runs out first."""
        return max(p.num_used / p.num_pages for p in self.pools)

    # ---- all pools at once ------------------------------------------------------------
    def can_allocate(self, tokens: Sequence[int]) -> bool:
        return all(p.can_allocate(tokens) for p in self.pools)

    def allocate(self, seq_id: int, tokens: Sequence[int]) -> Allocation | None:
        if not self.can_allocate(tokens):
            return None
        first = self.primary.allocate(seq_id, tokens)
        for p in self.pools[1:]:
            p.allocate(seq_id, tokens)
        return first

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        return all(p.can_append(seq_id, num_tokens) for p in self.pools)

    def append(self, seq_id: int, num_tokens: int) -> bool:
        if not self.can_append(seq_id, num_tokens):
            return False
        for p in self.pools:
            p.append(seq_id, num_tokens)
        return True

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        self.primary.commit(seq_id, tokens, num_computed)

    def free(self, seq_id: int) -> None:
        for p in self.pools:
            p.free(seq_id)

    def reset_prefix_cache(self) -> None:
        self.primary.reset_prefix_cache()


class TableError(ValueError):
    """A table about to be handed to a kernel is not one the block manager gave out."""


def check_batch(manager: BlockManager, seq_ids: Sequence[int],
                tables: Sequence[Sequence[int]], seq_lens: Sequence[int],
                writes: Sequence[tuple[int, int, int]]) -> None:
    """Host-side check of what a step hands to the kernels (a debug setting): each row
    is exactly its sequence's page table (a ring's: ``row``), every page id is in range and held, each
    length fits its pages, and each write ``(seq_id, position, slot)`` goes to the slot
    of that position in a page the sequence holds alone (slot -1: padding, no write)."""
    ps, n = manager.page_size, manager.num_pages
    if not len(seq_ids) == len(tables) == len(seq_lens):
        raise TableError("seq_ids, tables and seq_lens differ in length")
    for seq_id, row, length in zip(seq_ids, tables, seq_lens):
        if not manager.has(seq_id):
            raise TableError(f"sequence {seq_id} holds no pages")
        held = manager.table(seq_id)
        if list(row) != manager.row(seq_id, len(row) if manager.ring_pages else len(held)):
            raise TableError(f"sequence {seq_id}: table is not the block manager's")
        for page_id in row:
            if not 0 <= page_id < n:
                raise TableError(f"sequence {seq_id}: page {page_id} out of range 0..{n - 1}")
            if manager.ref_count(page_id) <= 0:
                raise TableError(f"sequence {seq_id}: page {page_id} is free")
        if not 0 <= length <= len(row) * ps:
            raise TableError(f"sequence {seq_id}: length {length} beyond its "
                             f"{len(row)} pages of {ps}")
    for seq_id, position, slot in writes:
        if slot == -1:
            continue
        if not manager.has(seq_id):
            raise TableError(f"sequence {seq_id} holds no pages")
        try:
            if position < 0:
                raise IndexError(position)
            expected = manager.slot(seq_id, position)
        except IndexError:
            raise TableError(f"sequence {seq_id}: position {position} beyond its pages") from None
        if slot != expected:
            raise TableError(f"sequence {seq_id}: position {position} written to slot "
                             f"{slot}, its slot is {expected}")
        if manager.ref_count(slot // ps) != 1:
            raise TableError(f"sequence {seq_id}: slot {slot} is in page {slot // ps}, "
                             f"shared by {manager.ref_count(slot // ps)} sequences")
