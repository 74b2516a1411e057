"""Which replica takes a request: ``pick(candidates, key, loads, policy) -> Pick``.

A pure function (no I/O, no clock, no randomness), so every choice is reproducible from
its inputs and tested with tiny worlds. The router's shell gathers the inputs: the
Model's ready replicas (EndpointSlices), how much of this request's prompt each replica
was last sent (``PrefixIndex``), the loads (its own open requests plus what the workers'
``/metrics`` said a moment ago).

Policy ``prefix`` (the default), in the order it decides:

1. Filter: a replica whose KV cache is at least ``kv_high`` full is *saturated*: it
   would evict the prefixes it caches and preempt sequences. Saturated replicas take a
   request only when every replica is saturated (reason ``saturated``, least loaded).
2. No prefix key (a prompt shorter than one block): the least loaded replica
   (``least-load``).
3. Preference order: most leading prompt blocks cached first (the router's index of
   what it sent where); among equal caches the least loaded; among equal loads
   rendezvous hashing (highest random weight) of the key's first ``hash_blocks``
   blocks. Rendezvous hashing is consistent hashing without a ring: each replica's
   weight is a hash of (key, replica), so a replica that comes or goes moves only the
   keys it owned, and router replicas with no shared state agree on where a request
   goes when neither cache nor load tells them apart. For a Model's handful of replicas
   it costs one integer mix per replica.
4. Bounded load (consistent hashing with bounded loads, as KubeAI does): walk the order
   and take the first replica whose load after this request stays within
   ``ceil(load_factor * (total + 1) / n) + slack``. The slack is absolute: decode is
   bound by memory bandwidth, so a replica serving one or two more sequences steps
   almost as fast, while a prefix it holds saves the whole prefill of it; without it, a
   lightly loaded fleet (bound 1) would send every second turn of a conversation
   elsewhere. The least loaded replica is always within the bound (``load_factor >=
   1``), so the walk ends. Reasons: ``prefix`` (a replica holding the longest cached
   prefix), ``hash`` (no cached prefix anywhere: the best by load, then hash), ``spill``
   (a better-placed replica was over the bound).

Policy ``round-robin`` (the baseline the e2e test measures against) and
``least-load`` ignore the prompt.

A replica's load is ``max(open, running + waiting)``: the requests this router has open
there (exact, now) or what the worker reported (a few hundred ms old, but it also
counts other routers' requests), whichever is larger.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Mapping, Optional, Sequence

Mode = Literal["prefix", "round-robin", "least-load"]
MODES: tuple[str, ...] = ("prefix", "round-robin", "least-load")
# Every reason a Pick can give (the router's metrics label picks with them).
REASONS: tuple[str, ...] = ("only", "prefix", "hash", "spill", "least-load", "saturated",
                            "round-robin")
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Candidate:
    """A ready replica of the Model, and how many of the request's leading prompt blocks
    the router last sent it (0: none, or the index forgot)."""

    name: str  # "ip:port"
    cached_blocks: int = 0


@dataclass(frozen=True)
class Load:
    """What is known of one replica's load. Scraped fields are 0 when unknown."""

    open: int = 0  # requests this router has open to it
    running: int = 0  # worker's kvpilot_requests_running
    waiting: int = 0  # worker's kvpilot_requests_waiting
    kv_usage: float = 0.0  # worker's kvpilot_kv_cache_usage_ratio, 0..1

    @property
    def requests(self) -> int:
        return max(self.open, self.running + self.waiting)


@dataclass(frozen=True)
class RequestKey:
    """``blocks``: chained hashes of the prompt's leading full blocks (``prefix``);
    ``seq``: the router's request counter (round robin)."""

    blocks: tuple[int, ...] = ()
    seq: int = 0


@dataclass(frozen=True)
class Policy:
    mode: Mode = "prefix"
    # Nobody takes a request that would put it above load_factor x the mean load (>= 1).
    load_factor: float = 1.25
    # The rendezvous key: the hash of this many leading blocks (all, if fewer). Long
    # enough to tell conversations apart, short enough to be the same on every turn.
    hash_blocks: int = 8
    kv_high: float = 0.9  # KV usage at which a replica counts as saturated
    slack: int = 2  # requests a replica may take above load_factor x the mean

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.load_factor) and self.load_factor >= 1):
            raise ValueError(f"load_factor must be >= 1, got {self.load_factor}")
        if self.hash_blocks < 1:
            raise ValueError(f"hash_blocks must be >= 1, got {self.hash_blocks}")
        if not 0 < self.kv_high <= 1:
            raise ValueError(f"kv_high must be in (0, 1], got {self.kv_high}")
        if self.slack < 0:
            raise ValueError(f"slack must be >= 0, got {self.slack}")


@dataclass(frozen=True)
class Pick:
    name: str
    reason: str  # one of REASONS


@lru_cache(maxsize=65536)
def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def weight(key: int, name: str) -> int:
    """Rendezvous weight of replica ``name`` for ``key``: splitmix64's finalizer over
    both hashes, so weights of one key are independent across replicas."""
    z = (key ^ _name_hash(name)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _least_loaded(cands: Sequence[Candidate], loads: Mapping[str, Load]) -> Candidate:
    def rank(c: Candidate):
        load = loads.get(c.name, _IDLE)
        return (load.requests, load.kv_usage, c.name)

    return min(cands, key=rank)


_IDLE = Load()


def pick(candidates: Sequence[Candidate], key: RequestKey, loads: Mapping[str, Load],
         policy: Policy) -> Optional[Pick]:
    """The replica for one request, and why; None when there is no candidate."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return Pick(candidates[0].name, "only")
    if policy.mode == "round-robin":
        ordered = sorted(c.name for c in candidates)
        return Pick(ordered[key.seq % len(ordered)], "round-robin")
    usable = [c for c in candidates if loads.get(c.name, _IDLE).kv_usage < policy.kv_high]
    if not usable:
        return Pick(_least_loaded(candidates, loads).name, "saturated")
    if policy.mode == "least-load" or not key.blocks:
        return Pick(_least_loaded(usable, loads).name, "least-load")

    requests = {c.name: loads.get(c.name, _IDLE).requests for c in usable}
    bound = math.ceil(policy.load_factor * (sum(requests.values()) + 1) / len(usable)) \
        + policy.slack
    owner_key = key.blocks[min(len(key.blocks), policy.hash_blocks) - 1]
    order = sorted(usable, key=lambda c: (-c.cached_blocks, requests[c.name],
                                          -weight(owner_key, c.name)))
    best_cached = order[0].cached_blocks
    for i, c in enumerate(order):
        if requests[c.name] + 1 > bound:
            continue
        if best_cached and c.cached_blocks == best_cached:
            return Pick(c.name, "prefix")
        return Pick(c.name, "hash" if i == 0 else "spill")
    # Not reached with load_factor >= 1 (the least loaded is within the bound).
    return Pick(_least_loaded(usable, loads).name, "least-load")
