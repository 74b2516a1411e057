"""The block manager in a tiny world: 10 pages of 16 tokens, exact page ids, ref counts
and eviction order."""

from __future__ import annotations

import pytest

from kvpilot.worker.block_manager import (
    BlockManager,
    TableError,
    check_batch,
    page_hash,
    ROOT_HASH,
)

PS = 16


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


@pytest.fixture
def bm() -> BlockManager:
    return BlockManager(10, PS)


def test_allocate_takes_pages_in_order_and_counts(bm):
    a = bm.allocate(1, toks(0, 40))  # 3 pages
    assert a.pages == (0, 1, 2) and a.cached_tokens == 0
    assert bm.num_used == 3 and bm.num_free == 7 and bm.num_cached_free == 0
    assert [bm.ref_count(p) for p in range(4)] == [1, 1, 1, 0]


def test_allocate_refuses_without_pages_and_changes_nothing(bm):
    assert bm.allocate(1, toks(0, 150)).pages == tuple(range(10))
    assert not bm.can_allocate(toks(1000, 1))
    assert bm.allocate(2, toks(1000, 1)) is None
    assert not bm.has(2) and bm.num_free == 0


def test_append_grows_at_page_boundaries_only(bm):
    bm.allocate(1, toks(0, 16))
    assert bm.table(1) == [0]
    assert bm.append(1, 16) and bm.table(1) == [0]
    assert bm.append(1, 17) and bm.table(1) == [0, 1]
    assert bm.append(1, 32) and bm.table(1) == [0, 1]


def test_append_refuses_when_full_and_changes_nothing(bm):
    bm.allocate(1, toks(0, 160))
    assert not bm.can_append(1, 161)
    assert not bm.append(1, 161)
    assert bm.table(1) == list(range(10))


def test_prefix_hit_shares_pages_and_counts_references(bm):
    prompt = toks(0, 40)  # pages 0, 1 full; page 2 holds 8 tokens
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 40)
    b = bm.allocate(2, toks(0, 32) + [7, 7, 7])
    assert b.pages == (0, 1, 3) and b.cached_tokens == 32
    assert [bm.ref_count(p) for p in range(4)] == [2, 2, 1, 1]
    assert bm.queried_tokens == 40 + 35 and bm.hit_tokens == 32


def test_only_computed_full_pages_are_shared(bm):
    prompt = toks(0, 40)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 20)  # only page 0 is full and computed
    assert bm.allocate(2, toks(0, 40)).pages == (0, 3, 4)


def test_last_prompt_token_is_always_computed(bm):
    prompt = toks(0, 32)  # exactly two pages
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 32)
    b = bm.allocate(2, prompt)
    # Page 1 holds the last token, whose logits are needed: it is not reused.
    assert b.pages == (0, 2) and b.cached_tokens == 16


def test_chained_hash_keys_whole_prefix_not_just_the_page(bm):
    first = toks(0, 16) + toks(100, 16) + [1]
    bm.allocate(1, first)
    bm.commit(1, first, 33)
    # Same second page after a different first page: no hit at all.
    other = toks(50, 16) + toks(100, 16) + [1]
    assert bm.allocate(2, other).cached_tokens == 0
    assert page_hash(ROOT_HASH, toks(0, 16)) != page_hash(ROOT_HASH, toks(50, 16))


def test_a_hash_collision_is_not_a_hit(bm):
    prompt = toks(0, 17)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 17)
    # Corrupt what page 0 says it holds: the hash still matches, the tokens do not.
    bm._pages[0].tokens = tuple(toks(1, 16))
    assert bm.allocate(2, prompt).cached_tokens == 0


def test_freed_full_pages_stay_cached_and_revive(bm):
    prompt = toks(0, 40)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 40)
    bm.free(1)
    assert bm.num_used == 0 and bm.num_cached_free == 2 and bm.num_free == 10
    b = bm.allocate(2, toks(0, 33))
    assert b.pages == (0, 1, 3) and b.cached_tokens == 32
    assert bm.num_cached_free == 0 and bm.ref_count(0) == 1


def test_empty_pages_go_before_cached_ones_then_lru(bm):
    a = toks(0, 33)  # pages 0, 1 cached after commit, page 2 not full
    bm.allocate(1, a)
    bm.commit(1, a, 33)
    b = toks(1000, 33)
    bm.allocate(2, b)  # pages 3, 4, 5
    bm.commit(2, b, 33)
    bm.free(1)  # frees 2 (empty), then 1 and 0 (cached): LRU order 1, 0
    bm.free(2)  # frees 5 (empty), then 4 and 3 (cached): LRU order 1, 0, 4, 3
    assert list(bm._cached_free) == [1, 0, 4, 3]
    # 6 pages: the empty ones first (6, 7, 8, 9, 2, 5), nothing evicted yet.
    c = bm.allocate(3, toks(5000, 96))
    assert c.pages == (6, 7, 8, 9, 2, 5) and bm.num_cached_free == 4
    # 2 more: evict least recently freed, page 1 then page 0 (sequence 1's prefix).
    d = bm.allocate(4, toks(9000, 32))
    assert d.pages == (1, 0)
    assert list(bm._cached_free) == [4, 3]
    # Sequence 2's prefix survives and still hits (pages 0, 1 are empty again).
    bm.free(4)
    e = bm.allocate(5, toks(1000, 33))
    assert e.pages == (3, 4, 0) and e.cached_tokens == 32


def test_shared_page_is_freed_only_by_its_last_holder(bm):
    prompt = toks(0, 20)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 20)
    bm.allocate(2, prompt)
    assert bm.ref_count(0) == 2
    bm.free(1)
    assert bm.ref_count(0) == 1 and bm.num_cached_free == 0
    bm.free(2)
    assert bm.ref_count(0) == 0 and bm.num_cached_free == 1


def test_can_allocate_counts_revived_cached_pages(bm):
    prompt = toks(0, 33)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 33)
    bm.free(1)  # 2 cached, 8 empty
    bm.allocate(2, toks(500, 16 * 8))  # takes all 8 empty pages
    assert bm.num_free == 2
    # A hit on both cached pages still needs 1 fresh page for the last token: 3 > 2.
    assert not bm.can_allocate(toks(0, 33))
    assert bm.allocate(3, toks(0, 33)) is None
    assert bm.num_cached_free == 2
    # 32 tokens: 1 hit (page 0) + 1 fresh (evicts cached page 1): fits.
    assert bm.allocate(3, toks(0, 32)).pages == (0, 1)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(10, PS, prefix_caching=False)
    prompt = toks(0, 40)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 40)
    assert bm.allocate(2, prompt).cached_tokens == 0
    bm.free(1)
    assert bm.num_cached_free == 0


def test_check_batch_accepts_what_the_manager_gave(bm):
    bm.allocate(1, toks(0, 20))
    bm.allocate(2, toks(100, 5))
    check_batch(bm, [1, 2], [bm.table(1), bm.table(2)], [20, 5],
                [(1, 19, 1 * PS + 3), (2, 4, 2 * PS + 4), (2, 0, -1)])


@pytest.mark.parametrize("tables, lens, writes, message", [
    ([[0, 1], [2]], [20, 5], [(1, 19, 1 * PS + 3)], None),
    ([[0, 7], [2]], [20, 5], [], "not the block manager's"),
    ([[0, 1], [2]], [33, 5], [], "beyond its 2 pages"),
    ([[0, 1], [2]], [20, 5], [(1, 19, 0 * PS + 3)], "its slot is 19"),
    ([[0, 1], [2]], [20, 5], [(2, 16, 2 * PS)], "beyond its pages"),
])
def test_check_batch_catches_bad_tables(bm, tables, lens, writes, message):
    bm.allocate(1, toks(0, 20))
    bm.allocate(2, toks(100, 5))
    if message is None:
        check_batch(bm, [1, 2], tables, lens, writes)
        return
    with pytest.raises(TableError, match=message):
        check_batch(bm, [1, 2], tables, lens, writes)


def test_check_batch_catches_out_of_range_and_freed_pages(bm):
    bm.allocate(1, toks(0, 20))
    bm._tables[1].pages[1] = 10  # a corrupted table: page id past the pool
    with pytest.raises(TableError, match="out of range"):
        check_batch(bm, [1], [bm.table(1)], [20], [])
    bm._tables[1].pages[1] = 5  # in range, but free
    with pytest.raises(TableError, match="page 5 is free"):
        check_batch(bm, [1], [bm.table(1)], [20], [])


def test_check_batch_refuses_writes_into_shared_pages(bm):
    prompt = toks(0, 17)
    bm.allocate(1, prompt)
    bm.commit(1, prompt, 17)
    bm.allocate(2, prompt)
    with pytest.raises(TableError, match="shared by 2"):
        check_batch(bm, [2], [bm.table(2)], [17], [(2, 3, 3)])
