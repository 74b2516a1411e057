"""A request's prompt prefix as block hashes, and the router's index of where it sent them.

The router has no tokenizer, so it cuts the prompt's text into blocks of
``block_chars`` characters (64 characters is about a 16-token page of a subword
tokenizer) and hashes them chained, as the worker's block manager hashes its pages:
block *i*'s hash covers blocks 0..i, so equal hashes mean equal whole prefixes. Only
full blocks count (a worker caches only full pages), and only the first ``max_blocks``
(the head is what decides where a conversation goes; the rest need not be read).

``PrefixIndex`` remembers, for recently routed block hashes, the replicas they were sent
to, most recent first. It approximates each replica's prefix cache from what the router
sent (the worker may have evicted it since; KV usage, which the router also reads, is
what warns of eviction). Bounded: least recently routed hashes go first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Iterable, Mapping

_SEPARATOR = "\x1e"  # between chat messages
_ROLE_END = "\x1f"


def prompt_head(body: Mapping[str, Any], limit: int) -> str:
    """The first ``limit`` characters of the request's prompt, canonical: a completion's
    ``prompt`` (the first of a list; token ids as decimal text), or a chat's messages as
    role and text, in order. Whatever the worker would refuse gives what it can (often
    ""): this is a routing hint, the worker validates."""
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list):
            return ""
        parts: list[str] = []
        size = 0
        for m in messages:
            if size >= limit:
                break
            if not isinstance(m, dict):
                continue
            text = _content_text(m.get("content"))
            role = m.get("role")
            part = f"{_SEPARATOR}{role if isinstance(role, str) else ''}{_ROLE_END}{text}"
            parts.append(part)
            size += len(part)
        return "".join(parts)[:limit]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list):
        out: list[str] = []
        size = 0
        for t in prompt:
            if size >= limit:
                break
            if type(t) is not int:
                return ""
            s = f"{t},"
            out.append(s)
            size += len(s)
        return "".join(out)[:limit]
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def block_hashes(text: str, block_chars: int, *, seed: str = "") -> tuple[int, ...]:
    """Chained 64-bit hashes of ``text``'s full blocks; ``seed`` (the Model's name)
    starts the chain, so two Models' equal prompts hash apart."""
    parent = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    out = []
    for start in range(0, len(text) - block_chars + 1, block_chars):
        block = text[start:start + block_chars].encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + block, digest_size=8).digest()
        out.append(int.from_bytes(parent, "little"))
    return tuple(out)


class PrefixIndex:
    """Block hash -> the replicas it was last routed to (at most ``per_block``, most
    recent first), for the ``capacity`` most recently routed hashes."""

    def __init__(self, capacity: int = 200_000, per_block: int = 8) -> None:
        if capacity < 1 or per_block < 1:
            raise ValueError("capacity and per_block must be >= 1")
        self.capacity = capacity
        self.per_block = per_block
        self._holders: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def matches(self, blocks: Iterable[int], names: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of ``blocks`` it was sent."""
        out = dict.fromkeys(names, 0)
        alive = list(out)
        for depth, h in enumerate(blocks, 1):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = [n for n in alive if n in holders]
            if not alive:
                break
            for n in alive:
                out[n] = depth
        return out

    def record(self, name: str, blocks: Iterable[int]) -> None:
        """``blocks`` were just routed to ``name``."""
        holders_of = self._holders
        for h in blocks:
            old = holders_of.pop(h, ())
            if old and old[0] == name:
                holders_of[h] = old
                continue
            holders_of[h] = (name, *[n for n in old if n != name][:self.per_block - 1])
        while len(holders_of) > self.capacity:
            holders_of.popitem(last=False)
