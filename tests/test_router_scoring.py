"""``pick()``: tiny worlds of two to four replicas, exact choices and reasons."""

from __future__ import annotations

import pytest

from kvpilot.router.scoring import Candidate, Load, Pick, Policy, RequestKey, pick, weight

A, B, C, D = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"
PREFIX = Policy()


def cands(*names: str, cached: dict[str, int] | None = None) -> list[Candidate]:
    return [Candidate(n, (cached or {}).get(n, 0)) for n in names]


def owner_order(key: int, *names: str) -> list[str]:
    """The rendezvous order of ``names`` for ``key`` (highest weight first)."""
    return sorted(names, key=lambda n: -weight(key, n))


def test_no_candidate_is_no_pick_and_one_is_the_only_choice():
    assert pick([], RequestKey((1,)), {}, PREFIX) is None
    assert pick(cands(A), RequestKey((1,)), {A: Load(open=50, kv_usage=1.0)}, PREFIX) == \
        Pick(A, "only")


def test_the_weights_are_a_fixed_function_of_key_and_name():
    # Fixed values: router replicas (and restarts) agree on every key's owner.
    assert weight(0, A) == weight(0, A)
    assert owner_order(7, A, B, C, D) == owner_order(7, D, C, B, A)
    owners = {owner_order(k, A, B, C, D)[0] for k in range(64)}
    assert owners == {A, B, C, D}  # 64 keys reach every replica


def test_with_nothing_cached_the_key_goes_to_its_rendezvous_owner():
    key = RequestKey((11, 22, 33))
    first = owner_order(33, A, B, C)[0]  # 3 blocks < hash_blocks: the last block's hash
    assert pick(cands(A, B, C), key, {}, PREFIX) == Pick(first, "hash")
    # the same with the candidates in another order
    assert pick(cands(C, A, B), key, {}, PREFIX) == Pick(first, "hash")


def test_the_rendezvous_key_is_the_hash_of_the_first_hash_blocks_blocks():
    policy = Policy(hash_blocks=2)
    short, long = RequestKey((11, 22)), RequestKey((11, 22, 33, 44, 55))
    # Every later turn of a conversation hashes to the same owner as its first.
    assert pick(cands(A, B, C, D), short, {}, policy) == \
        pick(cands(A, B, C, D), long, {}, policy) == Pick(owner_order(22, A, B, C, D)[0], "hash")


def test_removing_a_replica_moves_only_the_keys_it_owned():
    keys = [RequestKey((k,)) for k in range(200)]
    before = {k: pick(cands(A, B, C, D), k, {}, PREFIX).name for k in keys}
    after = {k: pick(cands(A, B, C), k, {}, PREFIX).name for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == D}


def test_the_longest_cached_prefix_wins_over_the_rendezvous_owner():
    key = RequestKey((1, 2, 3, 4, 5))
    owner = owner_order(5, A, B, C)[0]
    other = next(n for n in (A, B, C) if n != owner)
    world = cands(A, B, C, cached={owner: 2, other: 5})
    assert pick(world, key, {}, PREFIX) == Pick(other, "prefix")


def test_equal_cached_prefixes_are_ordered_by_rendezvous_weight():
    key = RequestKey((1, 2, 3, 4, 5))
    order = owner_order(5, A, B, C)
    world = cands(A, B, C, cached={A: 3, B: 3, C: 3})  # a shared system prompt, everywhere
    assert pick(world, key, {}, PREFIX) == Pick(order[0], "prefix")


def test_with_nothing_cached_the_least_loaded_goes_first_and_equal_loads_by_hash():
    key = RequestKey((9,))
    order = owner_order(9, A, B, C, D)
    loads = {order[0]: Load(open=1), order[1]: Load(open=1)}
    assert pick(cands(A, B, C, D), key, loads, PREFIX) == Pick(order[2], "hash")
    loads = {n: Load(open=1) for n in (A, B, C, D)}
    assert pick(cands(A, B, C, D), key, loads, PREFIX) == Pick(order[0], "hash")


def test_the_replica_with_the_prefix_keeps_it_within_the_slack():
    key = RequestKey((1, 2, 3, 4))
    world = cands(A, B, C, D, cached={A: 4})
    # a quiet fleet: total 1, so ceil(1.25 * 2 / 4) = 1; the slack lets A take a second
    loads = {A: Load(open=1)}
    assert pick(world, key, loads, PREFIX) == Pick(A, "prefix")
    # without slack this is pure bounded load: A is over 1, the idle ones take it
    no_slack = Policy(slack=0)
    assert pick(world, key, loads, no_slack) == Pick(owner_order(4, B, C, D)[0], "spill")


def test_bounded_load_spills_past_a_busy_replica_to_the_next_in_order():
    key = RequestKey((1, 2, 3, 4))
    world = cands(A, B, C, cached={A: 4, B: 2, C: 0})
    # total 5 over 3: bound = ceil(1.25 * 6 / 3) + 2 = 5; A at 4 takes it
    loads = {A: Load(open=4), B: Load(open=1), C: Load(open=0)}
    assert pick(world, key, loads, PREFIX) == Pick(A, "prefix")
    # A at 6 (total 7): bound ceil(1.25 * 8 / 3) + 2 = 6 and A would be at 7: the next
    # longest prefix, B, takes it
    loads[A] = Load(open=6)
    assert pick(world, key, loads, PREFIX) == Pick(B, "spill")
    # a looser factor keeps it on A: ceil(2 * 8 / 3) + 2 = 8
    assert pick(world, key, loads, Policy(load_factor=2)) == Pick(A, "prefix")


def test_load_is_the_larger_of_open_requests_and_what_the_worker_reports():
    assert Load(open=2, running=1, waiting=0).requests == 2
    assert Load(open=1, running=3, waiting=4).requests == 7
    key = RequestKey((1, 2))
    # A's worker reports a queue (another router's requests): total 7 over 2, bound
    # ceil(1.25 * 8 / 2) + 2 = 7, and A would be at 8
    loads = {A: Load(open=0, running=3, waiting=4)}
    assert pick(cands(A, B, cached={A: 2}), key, loads, PREFIX) == Pick(B, "spill")
    loads = {A: Load(open=5, running=1, waiting=0)}  # open counts too: bound 6, A to 6
    assert pick(cands(A, B, cached={A: 2}), key, loads, PREFIX) == Pick(A, "prefix")


def test_a_replica_at_kv_high_takes_nothing_while_another_has_room():
    key = RequestKey((9,))
    order = owner_order(9, A, B, C)
    loads = {order[0]: Load(kv_usage=0.95), order[1]: Load(kv_usage=0.5)}
    assert pick(cands(A, B, C, cached={order[0]: 1}), key, loads, PREFIX) == \
        Pick(order[1], "hash")
    # every one saturated: the least loaded, then the least KV, then the name
    full = {A: Load(open=2, kv_usage=0.99), B: Load(open=1, kv_usage=0.97),
            C: Load(open=1, kv_usage=0.92)}
    assert pick(cands(A, B, C), key, full, PREFIX) == Pick(C, "saturated")


def test_a_prompt_shorter_than_a_block_goes_to_the_least_loaded():
    loads = {A: Load(open=2), B: Load(running=1), C: Load(open=1, kv_usage=0.2)}
    assert pick(cands(A, B, C), RequestKey(()), loads, PREFIX) == Pick(B, "least-load")
    # ties: least KV usage, then the name
    assert pick(cands(C, B), RequestKey(()), {}, PREFIX) == Pick(B, "least-load")


def test_least_load_ignores_the_prompt():
    loads = {A: Load(open=1), B: Load(open=0)}
    world = cands(A, B, cached={A: 9})
    assert pick(world, RequestKey((1, 2)), loads, Policy(mode="least-load")) == \
        Pick(B, "least-load")


def test_round_robin_cycles_over_the_names_in_order_whatever_their_load():
    rr = Policy(mode="round-robin")
    loads = {A: Load(open=9, kv_usage=1.0)}
    assert [pick(cands(C, A, B), RequestKey((1,), seq=s), loads, rr).name
            for s in range(5)] == [A, B, C, A, B]
    assert pick(cands(A, B), RequestKey((), 3), {}, rr) == Pick(B, "round-robin")


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "random"}, "mode must be one of prefix, round-robin, least-load"),
    ({"load_factor": 0.9}, "load_factor must be >= 1"),
    ({"load_factor": float("nan")}, "load_factor must be >= 1"),
    ({"hash_blocks": 0}, "hash_blocks must be >= 1"),
    ({"kv_high": 0}, "kv_high must be in (0, 1]"),
    ({"slack": -1}, "slack must be >= 0"),
])
def test_a_bad_policy_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Policy(**kwargs)


@pytest.mark.parametrize("slack", [0, 2])
def test_bounded_load_never_leaves_the_request_unplaced(slack):
    # Every load vector of 3 replicas up to 4 requests each, the prefix on A: the pick is
    # within the bound, and it is A whenever A is.
    key = RequestKey((5,))
    policy = Policy(load_factor=1.0, slack=slack)
    for a in range(5):
        for b in range(5):
            for c in range(5):
                loads = {A: Load(open=a), B: Load(open=b), C: Load(open=c)}
                got = pick(cands(A, B, C, cached={A: 1}), key, loads, policy)
                bound = -(-(a + b + c + 1) // 3) + slack
                assert loads[got.name].requests + 1 <= bound, (a, b, c, got)
                assert (got == Pick(A, "prefix")) == (a + 1 <= bound), (a, b, c, got)
