"""A load generator: OpenAI-style streaming completions against a Model's workers.

Clients loop: pick a ready worker (round robin over what ``endpoints()`` returns, as a
Service would over Ready pods), stream one completion with a long prompt, and count its
outcome. Every request ends in exactly one bucket:

- ``complete``: the stream ended with a ``finish_reason`` and ``[DONE]``;
- ``rejected_429`` / ``rejected_503``: the worker said no, explicitly (queue full,
  draining); the client tries again elsewhere;
- ``truncated``: the stream ended without a finish reason or ``[DONE]``;
- ``failed``: no answer at all (connection refused or reset, timeout, another status).

``truncated`` and ``failed`` are what a scale-down must never cause.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx

WORDS = ("memory bandwidth decides how fast every decode step streams the weights and "
         "the whole key value cache from high bandwidth memory").split()


def prompt(tokens: int, rng: random.Random) -> str:
    """About ``tokens`` tokens for a byte-level tokenizer (one token per byte)."""
    out, size = [], 0
    while size < tokens:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:tokens]


@dataclass
class Load:
    endpoints: Callable[[], Sequence[str]]  # base URLs of ready workers
    model: str
    prompt_tokens: int = 300
    max_tokens: int = 64
    clients: int = 0  # how many run now; change it to ramp (a client ends after a request)
    counts: Counter = field(default_factory=Counter)
    served: Counter = field(default_factory=Counter)  # worker URL -> complete responses
    errors: list[str] = field(default_factory=list)
    _next: int = 0

    async def run(self, stop: asyncio.Event, seed: int = 0) -> None:
        rng = random.Random(seed)
        running: list[asyncio.Task] = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=15)) as client:
            while not stop.is_set():
                running = [t for t in running if not t.done()]
                while len(running) < self.clients:
                    running.append(asyncio.create_task(
                        self._client(client, len(running), rng.random(), stop)))
                await asyncio.sleep(0.2)
            await asyncio.gather(*running, return_exceptions=True)

    async def _client(self, client: httpx.AsyncClient, index: int, seed: float,
                      stop: asyncio.Event) -> None:
        rng = random.Random(seed)
        while not stop.is_set() and index < self.clients:  # a ramp down ends the newest
            urls = list(self.endpoints())
            if not urls:
                await asyncio.sleep(0.5)
                continue
            self._next += 1
            url = urls[self._next % len(urls)]
            outcome = await self.request(client, url, rng)
            self.counts[outcome] += 1
            if outcome == "complete":
                self.served[url] += 1
            if outcome.startswith("rejected"):
                await asyncio.sleep(0.2)

    async def request(self, client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
        body = {"model": self.model, "prompt": prompt(self.prompt_tokens, rng),
                "max_tokens": self.max_tokens, "stream": True, "temperature": 0}
        finish, done = None, False
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code in (429, 503):
                    return f"rejected_{resp.status_code}"
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    self.errors.append(f"{url}: HTTP {resp.status_code}: {text[:300]}")
                    return "failed"
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    finish = choice.get("finish_reason") or finish
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:  # never reached a worker
            self.errors.append(f"{url}: {type(err).__name__}: {err}")
            return "failed"
        except httpx.HTTPError as err:
            self.errors.append(f"{url}: {type(err).__name__}: {err}")
            return "truncated" if not done else "complete"
        return "complete" if finish and done else "truncated"


class LoadThread:
    """The async load generator on a thread of its own, driven from the test."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        await self.load.run(self.stop)

    def start(self) -> "LoadThread":
        self.thread.start()
        return self

    def finish(self) -> None:
        self.load.clients = 0
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=120)
